"""Native engine core without torch: KV block manager (ref counts, prefix caching, eviction) and
the token-budget scheduler (decode first, chunked prefill, preemption by recompute)."""

import subprocess
import sys

import pytest

from engines.native.block_manager import BlockManager
from engines.native.scheduler import Scheduler
from engines.native.sequence import Sequence, SeqStatus


def test_core_does_not_import_torch():
    code = ("import sys, engines.native.block_manager, engines.native.scheduler, "
            "engines.native.sequence; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- block manager --------------------------------------------------------------------------------


def test_allocate_grow_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate(1, list(range(10)), 10) == 0  # nothing cached yet
    assert len(bm.block_table(1)) == 3 and bm.num_free_blocks == 5
    assert bm.grow(1, 12) and len(bm.block_table(1)) == 3  # still fits in block 3
    assert bm.grow(1, 13) and len(bm.block_table(1)) == 4
    bm.free(1)
    assert bm.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_does_not_fit_is_none_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert bm.allocate(1, list(range(12)), 12) is None
    assert bm.num_free_blocks == 2 and 1 not in bm.tables
    assert bm.allocate(1, list(range(8)), 8) == 0
    assert bm.grow(1, 9) is False and len(bm.block_table(1)) == 2


def test_prefix_blocks_are_shared_by_hash():
    bm = BlockManager(num_blocks=16, block_size=4)
    prefix = [7, 7, 1, 2, 3, 4, 5, 6]  # two full blocks
    a = prefix + [10, 11, 12]
    assert bm.allocate(1, a, len(a)) == 0
    bm.register_full_blocks(1, a, len(a))  # after the prefill step
    b = prefix + [20, 21]
    assert bm.allocate(2, b, len(b)) == 8  # both prefix blocks reused
    assert bm.block_table(2)[:2] == bm.block_table(1)[:2]
    assert bm.blocks[bm.block_table(1)[0]].ref_count == 2
    assert bm.prefix_hit_tokens == 8
    # A different first block breaks the chain even if the second block matches.
    c = [9, 9, 1, 2] + prefix[4:] + [1]
    assert bm.allocate(3, c, len(c)) == 0


def test_last_prompt_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    p = list(range(8))  # exactly two blocks
    bm.allocate(1, p, 8)
    bm.register_full_blocks(1, p, 8)
    assert bm.allocate(2, p, 8) == 4  # the block holding token 7 is recomputed


def test_freed_cached_blocks_survive_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    p = [1, 2, 3, 4, 5]
    bm.allocate(1, p, 5)
    bm.register_full_blocks(1, p, 5)
    bm.free(1)
    assert bm.num_free_blocks == 4
    assert bm.allocate(2, p, 5) == 4  # still cached after its sequence ended
    bm.free(2)
    # Filling the whole pool with unrelated tokens evicts them.
    q = [9] * 8
    assert bm.allocate(3, q, 8) == 0
    bm.free(3)
    assert bm.allocate(4, p, 5) == 0


def test_cached_free_blocks_count_against_new_allocation():
    bm = BlockManager(num_blocks=3, block_size=2)
    p = [1, 2, 3, 4, 5]
    bm.allocate(1, p, 5)
    bm.register_full_blocks(1, p, 5)
    bm.free(1)
    # 2 cached hits (free) + 1 new block: exactly the 3 blocks there are.
    assert bm.allocate(2, p, 5) == 4
    assert bm.num_free_blocks == 0


# -- scheduler ------------------------------------------------------------------------------------


class FakeModel:
    """Deterministic 'model': the next token is (sum of the sequence's tokens) % 97. Checks that
    the scheduler only samples a sequence whose every token has been computed."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.steps = 0
        self.max_batch = 0

    def run(self, out):
        self.steps += 1
        self.max_batch = max(self.max_batch, len(out.chunks))
        sampled = {}
        for c in out.chunks:
            seq = self.sched.seqs[c.seq_id]
            assert c.start == seq.num_computed
            assert c.start + c.num_tokens <= seq.num_tokens
            blocks = self.sched.bm.block_table(c.seq_id)
            assert len(blocks) * self.sched.bm.block_size >= c.start + c.num_tokens
            if c.sample:
                assert c.start + c.num_tokens == seq.num_tokens
                sampled[c.seq_id] = sum(seq.token_ids) % 97
        return sampled


def expected_output(prompt, n):
    toks = list(prompt)
    for _ in range(n):
        toks.append(sum(toks) % 97)
    return toks[len(prompt):]


def run_all(sched, max_new: dict[int, int], max_steps=10_000):
    model = FakeModel(sched)
    done = {}
    while sched.has_work:
        out = sched.schedule()
        assert not out.is_empty, "scheduler stalled with work pending"
        assert out.num_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        sched.update(out, model.run(out))
        for seq in list(sched.running):
            if len(seq.output_ids) >= max_new[seq.id]:
                done[seq.id] = list(seq.output_ids)
                sched.finish(seq.id)
        assert model.steps < max_steps
    return done, model


def make_seqs(specs):
    return [Sequence(i, list(p)) for i, p in enumerate(specs)]


def test_continuous_batching_produces_every_sequence_exactly():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32)
    prompts = [[i + 1] * (3 + 5 * i) for i in range(12)]
    max_new = {i: 2 + (i * 7) % 9 for i in range(12)}
    for s in make_seqs(prompts):
        sched.add(s)
    done, model = run_all(sched, max_new)
    for i, p in enumerate(prompts):
        assert done[i] == expected_output(p, max_new[i])
    assert model.max_batch <= 8
    assert bm.num_free_blocks == 64


def test_decode_first_then_prefill_within_budget():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=10)
    a = Sequence(0, [1] * 6)
    sched.add(a)
    out = sched.schedule()
    assert [(c.seq_id, c.num_tokens, c.sample) for c in out.chunks] == [(0, 6, True)]
    sched.update(out, {0: 5})
    sched.add(Sequence(1, [2] * 20))
    out = sched.schedule()
    # The running decode comes first (1 token), then 9 tokens of the new prompt.
    assert [(c.seq_id, c.num_tokens, c.sample) for c in out.chunks] == [(0, 1, True),
                                                                         (1, 9, False)]


def test_chunked_prefill_splits_long_prompt():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    sched.add(Sequence(0, list(range(1, 41))))  # 40 tokens, budget 16
    chunks = []
    while True:
        out = sched.schedule()
        chunks += [(c.start, c.num_tokens, c.sample) for c in out.chunks]
        sched.update(out, {0: 1})
        if out.chunks[-1].sample:
            break
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True)]


def test_preemption_by_recompute_when_blocks_run_out():
    bm = BlockManager(num_blocks=10, block_size=4)  # 40 token slots for 4 sequences
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    prompts = [[i + 1] * 6 for i in range(4)]
    max_new = {i: 12 for i in range(4)}  # 4 x 18 tokens = 72 > 40: someone must wait
    for s in make_seqs(prompts):
        sched.add(s)
    done, _ = run_all(sched, max_new)
    assert sched.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert done[i] == expected_output(p, 12)  # recompute gives the same tokens
    assert bm.num_free_blocks == 10


def test_newest_is_preempted_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    for s in make_seqs([[1, 1, 1], [2, 2, 2]]):
        sched.add(s)
    out = sched.schedule()  # both admitted: 3 prompt tokens = 2 blocks each, pool full
    sched.update(out, {0: 3, 1: 4})
    out = sched.schedule()  # the 4th tokens still fit
    assert not out.preempted
    sched.update(out, {0: 3, 1: 4})
    out = sched.schedule()  # seq 0 needs a 3rd block for its 5th token: seq 1 is preempted
    assert out.preempted == [1]
    assert [c.seq_id for c in out.chunks] == [0]
    assert sched.seqs[1].status is SeqStatus.WAITING and sched.seqs[1].num_computed == 0
    assert sched.waiting[0].id == 1


def test_prefix_cache_hits_for_shared_prefix():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=256)
    system = list(range(1, 17))  # 16-token shared prefix = 4 blocks
    sched.add(Sequence(0, system + [50, 51]))
    done, _ = run_all(sched, {0: 2})
    for i in range(1, 4):
        sched.add(Sequence(i, system + [60 + i]))
    out = sched.schedule()
    starts = {c.seq_id: c.start for c in out.chunks}
    assert starts == {1: 16, 2: 16, 3: 16}  # only the new suffix is computed
    assert all(sched.seqs[i].num_cached_prompt == 16 for i in (1, 2, 3))


def test_abort_frees_blocks_at_once():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(Sequence(0, [1] * 10))
    sched.add(Sequence(1, [2] * 10))
    sched.update(sched.schedule(), {0: 1, 1: 1})
    used = 16 - bm.num_free_blocks
    sched.abort(1)
    assert bm.num_free_blocks == 16 - used // 2
    assert [s.id for s in sched.running] == [0]
    sched.add(Sequence(2, [3] * 5))
    sched.abort(2)  # aborting a waiting sequence works too
    assert not sched.waiting


@pytest.mark.parametrize("max_seqs", [1, 3])
def test_max_num_seqs_bounds_running(max_seqs):
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=256)
    for s in make_seqs([[1, 2, 3]] * 6):
        sched.add(s)
    done, model = run_all(sched, {i: 3 for i in range(6)})
    assert len(done) == 6 and model.max_batch == max_seqs


def test_prefix_cache_keys_are_keyed_digests_not_python_hash():
    """Blocks are found by a keyed BLAKE2b digest of (parent digest, token ids): collision-
    resistant, chained through the prefix, and keyed per process (not precomputable)."""
    import subprocess
    import sys

    from engines.native.block_manager import block_digest

    a = block_digest(None, [1, 2, 3, 4])
    assert len(a) == 16 and a == block_digest(None, [1, 2, 3, 4])
    assert a != block_digest(None, [1, 2, 3, 5])
    assert block_digest(a, [5, 6]) != block_digest(None, [5, 6])  # the parent is part of it
    assert block_digest(a, [5, 6]) != block_digest(block_digest(None, [9]), [5, 6])
    code = ("from engines.native.block_manager import block_digest; "
            "print(block_digest(None, [1, 2, 3, 4]).hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert other != a.hex()  # another process, another key
