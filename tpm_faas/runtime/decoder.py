"""The serving forward pass: a Llama decoder over a static, slot-addressed KV cache.

It reuses the loaded model's own modules (embedding, norms, projections, MLPs, ``lm_head``),
so a model wrapped by DeepSpeed AutoTP runs unchanged: its column-parallel projections give
each rank its share of the heads and its row-parallel ones all-reduce. What this module adds
is what ``transformers`` cannot do for iteration-level batching:

* one preallocated cache ``[layers, slots, kv_heads, max_len, head_dim]`` (no allocation per
  step), where each running sequence owns a *slot* and its own length;
* :meth:`Decoder.prefill` of one prompt into a slot (causal attention);
* :meth:`Decoder.decode` of one token for any set of slots, each at its own position
  (attention masked to each slot's length), so sequences of different lengths share a step.

Rotary tables are computed once for every position with the model's own rotary module, so the
numbers match the ``transformers`` forward.

On CUDA the decode step runs as a captured CUDA graph per batch bucket (1, 2, 4, ... slots):
:meth:`Decoder.decode_dense` has static shapes (slots ``0..B-1``, attention over the whole
cache, masked per slot), so a graph captured once is replayed with new tokens and positions
copied into its input buffers. Rows of idle slots in the bucket compute garbage that nobody
reads: a slot's positions are always written (prefill, then each decode) before they are read.
On CPU the dynamic :meth:`Decoder.decode` (attention only up to the longest sequence) is faster.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class Decoder:
    """Prefill and batched decode for a ``LlamaForCausalLM``-shaped model.

    :param model: the (possibly AutoTP-sharded) ``*ForCausalLM`` module
    :param slots: concurrent sequences the cache holds (the largest decode batch)
    :param max_len: tokens per sequence (prompt + generated); at most the model's context
    """

    def __init__(
        self, model: Any, *, slots: int, max_len: int, cuda_graphs: bool | None = None
    ) -> None:
        cfg = model.config
        core = model.model
        self.model = model
        self.embed = core.embed_tokens
        self.layers = list(core.layers)
        self.norm = core.norm
        self.lm_head = model.lm_head
        self.head_dim = int(
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        attn0 = self.layers[0].self_attn
        # Heads this rank holds (all of them at tp=1; a share of them under AutoTP).
        self.q_heads = _out_features(attn0.q_proj) // self.head_dim
        self.kv_heads = _out_features(attn0.k_proj) // self.head_dim
        self.slots = slots
        self.max_len = max_len
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        shape = (len(self.layers), slots, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        positions = torch.arange(max_len, device=self.device)[None]
        dummy = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = core.rotary_emb(dummy, positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        self.scaling = self.head_dim**-0.5
        self._arange = torch.arange(max_len, device=self.device)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[int, _Graph] = {}

    def run_plan(self, plan: dict[str, Any]) -> torch.Tensor:
        """Run one scheduler plan: ``{"op": "prefill", "slot", "ids"}`` or
        ``{"op": "decode", "slots", "tokens", "positions"}``."""
        if plan["op"] == "prefill":
            return self.prefill(int(plan["slot"]), list(plan["ids"]))
        return self.decode(plan["slots"], plan["tokens"], plan["positions"])

    # -- the two steps ---------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Run a prompt into ``slot`` (overwriting it); returns the last position's logits."""
        n = len(ids)
        if not 0 < n <= self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit a cache of {self.max_len}")
        x = self.embed(torch.tensor([ids], device=self.device))
        cos, sin = self.cos[:n][None, None], self.sin[:n][None, None]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # [1, h, n, d]
            self.k_cache[i, slot, :, :n] = k[0]
            self.v_cache[i, slot, :, :n] = v[0]
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True
            )
            x = self._finish_layer(layer, x, o)
        return self._logits(x[:, -1:])[:, 0]

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each slot, at that slot's position; returns logits ``[len(slots), V]``."""
        if self.cuda_graphs:
            return self._decode_graph(slots, tokens, positions)
        b = len(slots)
        pos = torch.tensor(positions, device=self.device)
        width = max(positions) + 1
        x = self.embed(torch.tensor(tokens, device=self.device)[:, None])  # [b, 1, hidden]
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [b, 1, 1, d]
        # Each slot attends to its own prefix: keys at positions <= its own.
        mask = (torch.arange(width, device=self.device)[None] <= pos[:, None])[:, None, None]
        contiguous = slots == list(range(slots[0], slots[0] + b))
        idx = torch.tensor(slots, device=self.device)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # [b, h, 1, d]
            self.k_cache[i, idx, :, pos] = k[:, :, 0]
            self.v_cache[i, idx, :, pos] = v[:, :, 0]
            if contiguous:  # a view, no gather
                keys = self.k_cache[i, slots[0] : slots[0] + b, :, :width]
                values = self.v_cache[i, slots[0] : slots[0] + b, :, :width]
            else:
                keys = self.k_cache[i, idx, :, :width]
                values = self.v_cache[i, idx, :, :width]
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True
            )
            x = self._finish_layer(layer, x, o)
        return self._logits(x)[:, 0]

    @torch.inference_mode()
    def decode_dense(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of slots ``0..B-1`` (``B = len(tokens)``), static shapes only.

        Every tensor's shape depends on ``B`` and ``max_len`` alone, and every op is a tensor
        op (no host synchronisation), so the step can be captured in a CUDA graph.
        """
        b = tokens.shape[0]
        rows = self._arange[:b]
        x = self.embed(tokens[:, None])
        cos = self.cos.index_select(0, positions)[:, None, None]
        sin = self.sin.index_select(0, positions)[:, None, None]
        mask = (self._arange[None] <= positions[:, None])[:, None, None]  # [b, 1, 1, max_len]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.k_cache[i, rows, :, positions] = k[:, :, 0]
            self.v_cache[i, rows, :, positions] = v[:, :, 0]
            o = F.scaled_dot_product_attention(
                q,
                self.k_cache[i, :b],
                self.v_cache[i, :b],
                attn_mask=mask,
                scale=self.scaling,
                enable_gqa=True,
            )
            x = self._finish_layer(layer, x, o)
        return self._logits(x)[:, 0]

    def _decode_graph(
        self, slots: list[int], tokens: list[int], positions: list[int]
    ) -> torch.Tensor:
        bucket = 1
        while bucket < max(slots) + 1:
            bucket *= 2
        bucket = min(bucket, self.slots)
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = self._graphs[bucket] = _Graph(self, bucket)
        tok = torch.zeros(bucket, dtype=torch.long)
        pos = torch.zeros(bucket, dtype=torch.long)
        idx = torch.tensor(slots)
        tok[idx] = torch.tensor(tokens)
        pos[idx] = torch.tensor(positions)
        return graph.run(tok, pos)[idx.to(self.device)]

    # -- pieces ----------------------------------------------------------------------------
    def _qkv(
        self, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        h = layer.input_layernorm(x)
        attn = layer.self_attn
        q = attn.q_proj(h).view(b, t, self.q_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _finish_layer(self, layer: Any, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        x = x + layer.self_attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        out: torch.Tensor = x + layer.mlp(layer.post_attention_layernorm(x))
        return out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.norm(x))
        return out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _out_features(linear: Any) -> int:
    return int(linear.weight.shape[0])


class _Graph:
    """A CUDA graph of :meth:`Decoder.decode_dense` for one batch bucket."""

    def __init__(self, dec: Decoder, bucket: int) -> None:
        self.tokens = torch.zeros(bucket, dtype=torch.long, device=dec.device)
        self.positions = torch.zeros(bucket, dtype=torch.long, device=dec.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (allocator, kernels) off the capture
            for _ in range(2):
                dec.decode_dense(self.tokens, self.positions)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = dec.decode_dense(self.tokens, self.positions)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.graph.replay()
        return self.logits
