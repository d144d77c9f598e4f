"""KV-cache block manager: fixed-size blocks, reference counts, automatic prefix caching.

Pure Python (no torch): it hands out block ids; the model runner owns the tensors they index.

A sequence's KV cache is a list of block ids (its block table); token i lives in block
table[i // block_size] at offset i % block_size. A block that is completely filled with tokens
gets a hash of (hash of the previous block, its token ids), so two sequences whose prompts share
a prefix share its full blocks: the second one finds them by hash and skips computing them. The
first block's parent is the sequence's salt (its LoRA adapter), so an adapter's blocks are only
ever shared with requests on the same adapter.
Freed blocks keep their hash and content until the block is handed out again (least recently
freed first), so a prefix stays cached after its sequence ends.

"Does not fit" is a return value (None / False); the scheduler decides what to preempt.
"""

from __future__ import annotations

import hashlib
import secrets
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

# Prefix-cache keys are keyed BLAKE2b digests of (parent digest, token ids), not Python's
# hash(): a crafted prompt must not collide with another user's blocks and reuse their KV
# (vLLM fixed the same class of bug as a CVE). The key is random per process, so digests
# cannot be precomputed offline. 16 bytes: a collision needs ~2^64 blocks.
_DIGEST_KEY = secrets.token_bytes(16)


def block_digest(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent or b"", digest_size=16, key=_DIGEST_KEY)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and registered for prefix caching


@dataclass
class BlockTable:
    """The blocks of one sequence, and how many of its leading tokens are registered."""

    blocks: list[int] = field(default_factory=list)
    # Number of leading full blocks whose hashes are registered (their content is final).
    num_hashed: int = 0
    # Hash of the last registered block (the parent for the next one).
    last_hash: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in the order they should be reused: blocks without a cached hash are taken
        # first (dict order = insertion order), then cached ones least recently freed first.
        self._free_uncached: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[bytes, int] = {}  # block digest -> block id
        self.tables: dict[int, BlockTable] = {}  # sequence id -> its blocks
        # Counters for tests and metrics.
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        return self.tables[seq_id].blocks

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, seq_id: int, token_ids: Sequence[int], num_tokens: int, *,
                 use_prefix_cache: bool = True, salt: bytes | None = None) -> int | None:
        """Give a new sequence room for its first `num_tokens` tokens (its prompt, or the first
        chunk of it), reusing cached full blocks of `token_ids`' prefix.

        Returns how many leading tokens are already in the cache (a multiple of block_size,
        always < len(token_ids) so at least one token is computed to get logits), or None if the
        free blocks do not suffice (nothing is changed then). `use_prefix_cache=False` reuses
        nothing, for a sequence that needs every position computed. `salt` is the parent of the
        first block's digest: sequences with different salts (LoRA adapters) share no block."""
        assert seq_id not in self.tables, f"sequence {seq_id} already has blocks"
        bs = self.block_size
        hits: list[int] = []
        parent: bytes | None = salt
        if self.enable_prefix_caching and use_prefix_cache:
            # Full blocks only, and never the block holding the last prompt token.
            for i in range((len(token_ids) - 1) // bs):
                h = block_digest(parent, token_ids[i * bs:(i + 1) * bs])
                bid = self._by_hash.get(h)
                if bid is None:
                    break
                hits.append(bid)
                parent = h
        cached_tokens = len(hits) * bs
        num_tokens = max(num_tokens, cached_tokens + 1)
        need_new = self.blocks_needed(num_tokens) - len(hits)
        # Cached hits that sit in the free list are not available as new blocks.
        free_after_hits = self.num_free_blocks - sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if need_new > free_after_hits:
            return None
        table = BlockTable()
        for bid in hits:
            self._take(bid)
            table.blocks.append(bid)
        table.num_hashed = len(hits)
        table.last_hash = parent
        for _ in range(need_new):
            table.blocks.append(self._take_free())
        self.tables[seq_id] = table
        self.prefix_query_tokens += len(token_ids)
        self.prefix_hit_tokens += cached_tokens
        return cached_tokens

    def grow(self, seq_id: int, num_tokens: int) -> bool:
        """Make room for `num_tokens` tokens in total (e.g. the next prefill chunk, or one more
        decode token). False (and no change) if the free blocks do not suffice."""
        table = self.tables[seq_id]
        need = self.blocks_needed(num_tokens) - len(table.blocks)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            table.blocks.append(self._take_free())
        return True

    def register_full_blocks(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Record the hashes of blocks that are now completely computed, so later sequences with
        the same prefix can reuse them. `token_ids` = all tokens of the sequence so far."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[seq_id]
        bs = self.block_size
        while (table.num_hashed + 1) * bs <= num_computed:
            i = table.num_hashed
            h = block_digest(table.last_hash, token_ids[i * bs:(i + 1) * bs])
            bid = table.blocks[i]
            block = self.blocks[bid]
            existing = self._by_hash.get(h)
            if existing is None:
                block.hash = h
                self._by_hash[h] = bid
            # else: another sequence computed the same block first; keep that one as the
            # canonical copy and leave ours unhashed (it is freed with this sequence).
            table.num_hashed += 1
            table.last_hash = h

    def free(self, seq_id: int) -> None:
        """Release a finished, aborted or preempted sequence's blocks."""
        table = self.tables.pop(seq_id, None)
        if table is None:
            return
        # Free in reverse so the tail of a sequence is reused before its (more shareable) head.
        for bid in reversed(table.blocks):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                if block.hash is not None:
                    self._free_cached[bid] = None
                else:
                    self._free_uncached[bid] = None

    # -- internals -----------------------------------------------------------------------------

    def _take(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            self._free_cached.pop(bid, None)
            self._free_uncached.pop(bid, None)
        block.ref_count += 1

    def _take_free(self) -> int:
        if self._free_uncached:
            bid, _ = self._free_uncached.popitem(last=False)
        else:
            bid, _ = self._free_cached.popitem(last=False)
            block = self.blocks[bid]
            # Evicting a cached block: its old content is about to be overwritten.
            if block.hash is not None and self._by_hash.get(block.hash) == bid:
                del self._by_hash[block.hash]
            block.hash = None
        self.blocks[bid].ref_count = 1
        return bid
