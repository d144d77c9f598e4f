"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged KV cache.

Written for this engine: weights are read straight from the HF safetensors files (q/k/v and
gate/up fused into one matmul each), every forward pass takes a flat batch of tokens from many
sequences (prefill chunks and decode tokens mixed), and keys/values live in a block pool indexed
by slot = block_id * block_size + offset.

With tensor parallelism (parallel.py) each rank loads only its slice of every weight, and H,
KV, the MLP width and the vocabulary below are this rank's share.

Shapes: T = tokens in the step, H = query heads, KV = key/value heads, D = head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engines.native.quant import (OneDnnLinear, matmul, onednn_available, onednn_serves,
                                  quantize_linear)
from engines.native.spec import UnsupportedModel, read_spec
from engines.options import CPU_MATMUL

if TYPE_CHECKING:
    from engines.native.lora import StepLora
    from engines.native.parallel import TensorParallel

def rope_inv_freq(model_dir: str | Path) -> tuple[torch.Tensor, float]:
    """inv_freq [D/2] and the attention scaling for the model's RoPE variant, computed with
    transformers' own functions so scaled variants (llama3, linear, yarn) match HF exactly."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(str(model_dir))
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    fn = (LlamaRotaryEmbedding.compute_default_rope_parameters if rope_type == "default"
          else ROPE_INIT_FUNCTIONS[rope_type])
    inv_freq, scaling = fn(config)
    return inv_freq.float(), float(scaling)


class _Checkpoint:
    """The model's safetensors files, read tensor by tensor: with tensor parallelism a rank
    reads only its rows or columns of each weight (safetensors slices the file, no full copy)."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise UnsupportedModel(f"no *.safetensors files in {model_dir}")
        self.model_dir = model_dir
        self._where = {}
        for f in files:
            handle = safe_open(str(f), framework="pt")
            self._where.update(dict.fromkeys(handle.keys(), handle))
        self.unread = set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str):
        if name not in self._where:
            raise UnsupportedModel(f"weight {name!r} missing from {self.model_dir}")
        return self._where[name].get_slice(name)

    def rows(self, name: str) -> int:
        return self._slice(name).get_shape()[0]

    def read(self, name: str, *, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        """The whole tensor, or rows [lo, hi) of it, or columns [lo, hi) of a matrix."""
        part = self._slice(name)
        self.unread.discard(name)
        if rows is not None:
            return part[rows[0]:rows[1]]
        if cols is not None:
            return part[:, cols[0]:cols[1]]
        return part[:]


class LlamaModel:
    """Weights and the forward pass. Not an nn.Module: there is nothing to train, and plain
    tensors keep the hot loop free of module-call overhead."""

    def __init__(self, model_dir: str | Path, *, dtype: torch.dtype, device: torch.device,
                 tp: TensorParallel | None = None, quantize: str | None = None,
                 cpu_matmul: str = "auto"):
        model_dir = Path(model_dir)
        self.spec, _ = read_spec(model_dir)
        s = self.spec
        self.dtype, self.device, self.tp = dtype, device, tp
        ckpt = _Checkpoint(model_dir)
        rank, size = (tp.rank, tp.size) if tp is not None else (0, 1)
        # This rank's heads: KV-head groups stay whole, so each rank's query heads read only
        # its own key/value heads (query head h uses KV head h // (H / KV)).
        self.num_heads, self.num_kv_heads = s.num_heads // size, s.num_kv_heads // size
        d, ff = s.head_dim, s.intermediate_size // size
        q_rows = (rank * self.num_heads * d, (rank + 1) * self.num_heads * d)
        kv_rows = (rank * self.num_kv_heads * d, (rank + 1) * self.num_kv_heads * d)
        ff_rows = (rank * ff, (rank + 1) * ff)

        def get(name: str, **part) -> torch.Tensor:
            return ckpt.read(name, **part).to(device=device, dtype=dtype)

        def vocab_rows(name: str) -> torch.Tensor:
            # [Vp, hidden]: rows [rank * Vp, (rank + 1) * Vp) of the vocabulary, the last
            # rank's zero-padded when V does not divide.
            total = ckpt.rows(name)
            per = -(-total // size)
            lo, hi = min(rank * per, total), min((rank + 1) * per, total)
            w = get(name, rows=(lo, hi))
            if hi - lo < per:
                w = torch.cat([w, w.new_zeros(per - (hi - lo), w.shape[1])])
            return w

        self.embed = vocab_rows("model.embed_tokens.weight")  # [V, hidden]
        self.vocab_size = ckpt.rows("model.embed_tokens.weight")  # logits width, unpadded
        self.vocab_lo = rank * self.embed.shape[0]  # first token id of this rank's rows
        self.layers = []
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            qkv = torch.cat([get(a + "q_proj.weight", rows=q_rows),
                             get(a + "k_proj.weight", rows=kv_rows),
                             get(a + "v_proj.weight", rows=kv_rows)])  # [(H + 2KV) * D, hidden]
            qkv_b = None
            if a + "q_proj.bias" in ckpt:
                qkv_b = torch.cat([get(a + "q_proj.bias", rows=q_rows),
                                   get(a + "k_proj.bias", rows=kv_rows),
                                   get(a + "v_proj.bias", rows=kv_rows)])
            self.layers.append({
                "in_norm": get(p + "input_layernorm.weight"),
                "qkv": qkv.t().contiguous(),  # [hidden, (H + 2KV) * D]: x @ W, no transpose per call
                "qkv_b": qkv_b,
                # Row-parallel: this rank's H * D inputs; the partial sums are all-reduced.
                "o": get(a + "o_proj.weight", cols=q_rows).t().contiguous(),  # [H * D, hidden]
                "post_norm": get(p + "post_attention_layernorm.weight"),
                "gate_up": torch.cat([get(p + "mlp.gate_proj.weight", rows=ff_rows),
                                      get(p + "mlp.up_proj.weight", rows=ff_rows)]
                                     ).t().contiguous(),  # [hidden, 2F]
                "down": get(p + "mlp.down_proj.weight",
                            cols=ff_rows).t().contiguous(),  # [F, hidden]
            })
        self.norm = get("model.norm.weight")
        if "lm_head.weight" in ckpt and not s.tie_word_embeddings:
            self.lm_head = vocab_rows("lm_head.weight")  # [V, hidden]
        else:
            self.lm_head = self.embed
        self.ff_size = ff  # this rank's share of the MLP width
        # option.quantize (quant.py): each matmul weight replaced by its quantized form, one
        # at a time so the fp32 copies go as they are converted. The LM head gets its own
        # [hidden, V] copy; the embedding table stays in the model dtype for the row lookup.
        self.quantize = quantize
        self.lm_head_q = None
        # option.cpu_matmul=auto|onednn (the default on CPU): unquantized fp32/bf16 weights
        # are reordered once into oneDNN's blocked layout (quant.OneDnnLinear), the LM head
        # into its own copy when it is tied to the embedding table.
        if cpu_matmul not in CPU_MATMUL:
            raise ValueError(f"option.cpu_matmul={cpu_matmul!r} is not one of "
                             f"{', '.join(CPU_MATMUL)}")
        self.cpu_matmul = ("onednn" if quantize is None and cpu_matmul != "torch"
                           and onednn_serves(device, dtype) else "torch")
        if cpu_matmul == "onednn" and self.cpu_matmul != "onednn" and quantize is None:
            raise ValueError(f"option.cpu_matmul=onednn needs a CPU device, fp32 or bf16 "
                             f"weights and torch built with oneDNN (here: {device.type}, "
                             f"{dtype}, oneDNN {onednn_available()})")
        if quantize is not None or self.cpu_matmul == "onednn":
            def convert(w: torch.Tensor, lm_head: bool = False):
                return (quantize_linear(w, quantize, lm_head=lm_head) if quantize is not None
                        else OneDnnLinear(w))

            for layer in self.layers:
                for name in ("qkv", "o", "gate_up", "down"):
                    layer[name] = convert(layer[name])
            self.lm_head_q = convert(self.lm_head.t(), lm_head=True)
            if self.lm_head is not self.embed:
                self.lm_head = None  # only the converted copy is used
        # A weight this forward pass does not use (o_proj or MLP biases, say) would silently
        # give wrong outputs: refuse the model so the caller falls back to `hf`.
        unused = sorted(k for k in ckpt.unread if k != "lm_head.weight"
                        and not k.endswith("inv_freq"))
        if unused:
            raise UnsupportedModel(f"the native engine does not use weights {unused[:4]} of "
                                   f"{model_dir}; run this model with the hf engine")
        inv_freq, self.rope_scaling = rope_inv_freq(model_dir)
        self.inv_freq = inv_freq.to(device)
        self.scale = 1.0 / math.sqrt(s.head_dim)
        # The C++ CPU ops (cpu_kernels.py: norms, decode attention) where they build; they
        # take fp32 and bf16.
        self.cpu_ops = None
        if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            from engines.native import cpu_kernels

            self.cpu_ops = cpu_kernels.load()
        # Set by the runner for option.attention_backend=cpp: cpu_ops.decode_attention.
        self.decode_kernel = None
        self.q_size = self.num_heads * s.head_dim
        self.kv_size = self.num_kv_heads * s.head_dim

    # -- KV cache -------------------------------------------------------------------------------

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s = self.spec
        self.block_size = block_size
        shape = (num_blocks * block_size, self.num_kv_heads, s.head_dim)  # [slots, KV, D]
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device))
                for _ in range(s.num_layers)]

    def kv_bytes_per_token(self) -> int:
        s = self.spec
        return 2 * s.num_layers * self.num_kv_heads * s.head_dim * torch.finfo(self.dtype).bits // 8

    # -- forward --------------------------------------------------------------------------------

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As HF computes it: in fp32, then back to the model dtype before the weight. On CPU
        # one C++ op (csrc/rms_norm.cpp); in fp32 torch's rms_norm gives bit-identical results
        # with fewer ops than the formula.
        if self.cpu_ops is not None:
            return self.cpu_ops.rms_norm(x, weight, self.spec.rms_norm_eps)
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.spec.rms_norm_eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.spec.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def _add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
        """x += delta (the residual, in place), then the norm of x."""
        if self.cpu_ops is not None and delta.stride(-1) == 1:
            return self.cpu_ops.add_rms_norm_(x, delta, weight, self.spec.rms_norm_eps)
        x.add_(delta)
        return self._rms_norm(x, weight)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        cos = (freqs.cos() * self.rope_scaling).to(self.dtype)[:, None, :]  # [T, 1, D/2]
        sin = (freqs.sin() * self.rope_scaling).to(self.dtype)[:, None, :]
        return cos, sin

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # HF's rotate_half form, x * [cos, cos] + [-x2, x1] * [sin, sin], on the two halves
        # directly: half the multiplies and no concatenated temporaries.
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.empty_like(x)
        torch.addcmul(x1 * cos, x2, sin, value=-1, out=out[..., :half])
        torch.addcmul(x2 * cos, x1, sin, out=out[..., half:])
        return out

    def forward(self, batch: "StepBatch", kv_cache) -> torch.Tensor:
        """Hidden states of the tokens whose logits are needed: [N, hidden]."""
        s = self.spec
        tp = self.tp
        x = self._embed(batch.token_ids)  # [T, hidden]
        cos, sin = self._rope(batch.positions)
        decode = (self._decode_buffers(batch)
                  if batch.decode_count and batch.decode_seq_lens is None else None)
        lora = batch.lora  # LoRA rows of this step (lora.py), None when no row has an adapter
        last = len(self.layers) - 1
        # The residual stream x is updated in place; each norm follows its residual add.
        h = self._rms_norm(x, self.layers[0]["in_norm"])
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_cache)):
            qkv = matmul(h, layer["qkv"])  # [T, (H + 2KV) * D]
            if layer["qkv_b"] is not None:
                qkv = qkv + layer["qkv_b"]
            if lora is not None:
                lora.apply(i, "qkv", h, qkv)
            # RoPE on the query and key heads together: [T, H + KV, D] in one pass.
            qk = self._apply_rope(qkv[:, :self.q_size + self.kv_size].view(
                -1, self.num_heads + self.num_kv_heads, s.head_dim), cos, sin)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]  # [T, H, D], [T, KV, D]
            v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, s.head_dim)
            k_cache.index_copy_(0, batch.slot_mapping, k)
            v_cache.index_copy_(0, batch.slot_mapping, v)
            attn = self._attention(q, k, v, k_cache, v_cache, batch, decode, i)  # [T, H * D]
            o = matmul(attn, layer["o"])  # [T, hidden]
            if lora is not None:  # with TP: this rank's partial delta joins the all-reduce
                lora.apply(i, "o", attn, o)
            h = self._add_rms_norm(x, o if tp is None else tp.all_reduce(o), layer["post_norm"])
            gate_up = matmul(h, layer["gate_up"])  # [T, 2F]
            if lora is not None:
                lora.apply(i, "gate_up", h, gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up  # [T, F]
            down = matmul(act, layer["down"])  # [T, hidden]
            if lora is not None:
                lora.apply(i, "down", act, down)
            down = down if tp is None else tp.all_reduce(down)
            if i < last:
                h = self._add_rms_norm(x, down, self.layers[i + 1]["in_norm"])
            else:
                x.add_(down)
        x = x[batch.logits_index]  # only the rows that sample: [N, hidden]
        return self._rms_norm(x, self.norm)

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed[token_ids]  # [T, hidden]
        # Vocab-parallel: ids outside this rank's rows give zeros; the sum over ranks is then
        # exactly the one real row.
        local = token_ids - self.vocab_lo  # [T]
        outside = (local < 0) | (local >= self.embed.shape[0])
        x = self.embed[local.clamp(0, self.embed.shape[0] - 1)]  # [T, hidden]
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, V] fp32; with tensor parallelism on rank 0 only (None on the other ranks)."""
        if self.lm_head_q is not None:
            logits = self.lm_head_q(hidden)  # [N, V] (this rank's Vp with TP)
        else:
            logits = hidden @ self.lm_head.t()  # [N, V] (this rank's Vp with TP)
        if self.tp is not None:
            logits = self.tp.gather_last_dim(logits)  # [N, TP * Vp] on rank 0
            if logits is None:
                return None
            logits = logits[:, :self.vocab_size]  # drop the padding rows
        return logits.float()

    # -- decode attention ------------------------------------------------------------------------
    #
    # Decode rows need every earlier key/value of their sequence side by side. Gathering them
    # from the block pool each step copies the whole live KV cache once per step, which on a CPU
    # costs as much as the attention itself (memory bandwidth). So on CPU the decode batch keeps
    # a contiguous copy per layer, [B, KV, capacity, D]: while the same sequences keep decoding
    # (the common case) each step only appends one row per sequence; when the set changes, the
    # copy is rebuilt from the pool. On GPU, decode rows use the paged-attention kernel
    # (paged_attention.py), which reads the blocks in place.

    def _decode_buffers(self, batch: "StepBatch") -> dict | None:
        if self.device.type != "cpu":
            return None
        s = self.spec
        nd = batch.decode_count
        length = batch.decode_slots.shape[1] * self.block_size
        st = getattr(self, "_decode_state", None)
        reuse = (st is not None and st["key"] == batch.decode_key and length <= st["cap"]
                 and all(a == b + 1 for a, b in zip(batch.decode_lens, st["lens"])))
        if not reuse:
            cap = length + 8 * self.block_size  # room for 8 blocks of growth before a rebuild
            # Keys transposed, [B, KV, D, cap]: q @ K^T reads them as a plain [D, L] operand,
            # and the C++ kernel's 16-key tiles are contiguous. Values [B, KV, cap, D].
            # A rebuild reuses the memory of the last one when the new batch fits in it
            # (views of it): allocating and first-touching ~10 MB a layer cost 0.5 s of a 7 s
            # batch-32 run, and with continuous batching the set of rows changes often.
            store = getattr(self, "_decode_store", None)
            if store is None or nd > store[0] or cap > store[1]:
                kshape = (nd, self.num_kv_heads, s.head_dim, cap)
                vshape = (nd, self.num_kv_heads, cap, s.head_dim)
                # With torch's ops zeroed, not empty: masked positions still enter q.k there,
                # and garbage (NaN/inf) would poison the softmax even with a zero weight. The
                # C++ kernel reads only each row's valid positions. (Stale keys of earlier rows
                # are finite, so reused memory needs no clearing.)
                new = torch.empty if self.decode_kernel is not None else torch.zeros
                store = (nd, cap, [(new(kshape, dtype=self.dtype, device=self.device),
                                    new(vshape, dtype=self.dtype, device=self.device))
                                   for _ in self.layers])
                self._decode_store = store
            st = {"key": batch.decode_key, "cap": cap,
                  "bufs": [(kb[:nd, :, :, :cap], vb[:nd, :, :cap]) for kb, vb in store[2]]}
            self._decode_state = st
        st["lens"] = batch.decode_lens
        st["reuse"] = reuse
        st["rows"] = torch.arange(nd, device=self.device)
        st["last"] = torch.tensor(batch.decode_lens, device=self.device) - 1  # [B] new positions
        st["length"] = length
        # fp32 matmuls read the [B, KV, L, D] slice of the buffers in place; 16-bit ones
        # (oneDNN) would first copy that strided slice, i.e. the whole live cache, every layer.
        # So in 16 bits attention runs over the whole capacity (contiguous), with the slack
        # past L masked: at most 8 blocks of extra keys instead of a copy of all of them.
        st["full"] = self.dtype != torch.float32 and self.decode_kernel is None
        st["lens_t"] = st["last"] + 1  # [B] int64: valid positions of each row's buffer
        if self.decode_kernel is None:  # the kernel needs no mask
            mask = batch.decode_mask  # [B, 1, 1, L]
            if st["full"]:
                mask = F.pad(mask, (0, st["cap"] - length), value=False)  # [B, 1, 1, cap]
            st["bias"] = _mask_bias(mask, self.dtype)  # once per step, not per layer
        return st

    def _attention(self, q, k, v, k_cache, v_cache, batch: "StepBatch", decode: dict | None,
                   layer: int) -> torch.Tensor:
        s = self.spec
        kvh = self.num_kv_heads
        gqa = kvh != self.num_heads
        outs = []
        # Decode rows (one query each) attend together over [B, L, KV, D] keys with a padding
        # mask. Prefill chunks run one by one with a causal mask offset by their start.
        if batch.decode_seq_lens is not None:
            from engines.native.paged_attention import paged_decode_attention

            nd = batch.decode_count
            o = paged_decode_attention(
                q[:nd], k_cache, v_cache, batch.decode_slots, batch.decode_seq_lens,
                block_size=self.block_size, scale=self.scale,
                sliding_window=s.sliding_window or 0)  # [B, H, D]
            outs.append(o.reshape(nd, -1))
        elif batch.decode_count:
            nd = batch.decode_count
            nb = batch.decode_slots.shape[1]
            length = nb * self.block_size
            if decode is None or not decode["reuse"]:
                kd = k_cache.view(-1, self.block_size, kvh, s.head_dim)[
                    batch.decode_slots].view(nd, length, kvh, s.head_dim)
                vd = v_cache.view(-1, self.block_size, kvh, s.head_dim)[
                    batch.decode_slots].view(nd, length, kvh, s.head_dim)
                kd, vd = kd.transpose(1, 2).transpose(-1, -2), vd.transpose(1, 2)
                # [B, KV, D, L], [B, KV, L, D]
            if decode is not None:
                kb, vb = decode["bufs"][layer]  # [B, KV, D, cap], [B, KV, cap, D]
                if decode["reuse"]:
                    kb[decode["rows"], :, :, decode["last"]] = k[:nd]  # [B, KV, D] at row ends
                    vb[decode["rows"], :, decode["last"]] = v[:nd]
                else:
                    kb[..., :length].copy_(kd)
                    vb[:, :, :length].copy_(vd)
                # 16-bit torch ops run over the whole capacity (see _decode_buffers).
                kd, vd = (kb, vb) if decode["full"] else (kb[..., :length], vb[:, :, :length])
            if decode is not None and self.decode_kernel is not None:
                # The C++ kernel (csrc/decode_attention.cpp) reads each row's buffer in place.
                o = self.decode_kernel(q[:nd], kb, vb, decode["lens_t"], self.scale,
                                       s.sliding_window or 0)  # [B, H, D]
            else:
                # Two batched matmuls over [B, KV] with each KV head's G = H / KV query heads
                # as the rows (query head h reads KV head h // G): on CPU ~15% faster than
                # SDPA's flash kernel for one query per sequence.
                qd = q[:nd].view(nd, kvh, self.num_heads // kvh, s.head_dim)  # [B, KV, G, D]
                scores = torch.matmul(qd, kd)  # [B, KV, G, L]
                scores.mul_(self.scale).add_(decode["bias"] if decode is not None
                                              else _mask_bias(batch.decode_mask, scores.dtype))
                o = torch.matmul(torch.softmax(scores, dim=-1), vd)  # [B, KV, G, D]
            outs.append(o.reshape(nd, -1))
        for start_row, n, slots, mask in batch.prefills:
            qp = q[start_row:start_row + n].transpose(0, 1)  # [H, n, D]
            if slots is None:
                # A chunk from position 0 attends only to itself: use its fresh keys/values
                # instead of gathering them back from the cache.
                kp = k[start_row:start_row + n].transpose(0, 1)  # [KV, n, D]
                vp = v[start_row:start_row + n].transpose(0, 1)
            else:
                kp = k_cache[slots].transpose(0, 1)  # [KV, L, D]
                vp = v_cache[slots].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                qp.unsqueeze(0), kp.unsqueeze(0), vp.unsqueeze(0), attn_mask=mask,
                is_causal=mask is None, scale=self.scale, enable_gqa=gqa)  # [1, H, n, D]
            outs.append(o[0].transpose(0, 1).reshape(n, -1))
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask (True = attend) as the additive 0 / -inf bias softmax takes."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf"))


@dataclass
class StepBatch:
    """Tensors for one forward pass. Rows are ordered: decode tokens first, then prefill chunks."""

    token_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    slot_mapping: torch.Tensor  # [T] long: where each token's K/V is written
    logits_index: torch.Tensor  # [N] long: rows whose logits are needed
    decode_count: int
    decode_slots: torch.Tensor | None  # [B, NB] long: block table of each decode row (padded)
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] bool: True = attend
    # (row, n, slots [L] | None, mask [n, L] | None); None, None: a chunk starting at position 0
    # with no sliding window, attending causally to itself only.
    prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]
    decode_key: tuple[int, ...] = ()  # seq ids of the decode rows, in order
    decode_lens: tuple[int, ...] = ()  # their lengths including this step's token
    # Set when decode rows use the paged-attention kernel: [B] int32, decode_lens on the device
    # (decode_mask is then None and the kernel reads the blocks of decode_slots in place).
    decode_seq_lens: torch.Tensor | None = None
    lora: StepLora | None = None  # rows with a LoRA adapter (engines/native/lora.py)
