"""The serving forward pass: a decoder over a static, slot-addressed KV cache.

It runs the loaded model's own modules through :mod:`tpm_faas.runtime.arch` (the
architectures of :data:`tpm_faas.architectures.SUPPORTED`: Llama, Mistral, Qwen2, Qwen3, GPT-2,
Mixtral, Qwen3-MoE, DeepSeek-V3 and Kimi K2), so a model wrapped by DeepSpeed AutoTP runs
unchanged: its column-parallel projections give each rank its share of the heads and its
row-parallel ones all-reduce. What this module adds
is what ``transformers`` cannot do for iteration-level batching and interventions:

* one preallocated cache ``[layers, slots, kv_heads, max_len, head_dim]`` of keys, and one of
  values with their own ``v_head_dim`` (narrower than the keys under DeepSeek's multi-head
  latent attention, whose expanded keys and values it holds), no allocation per step, where
  each running sequence owns a *slot* and its own length;
* :meth:`Decoder.prefill` of one prompt into a slot (causal attention);
* :meth:`Decoder.decode` of one token for any set of slots, each at its own position
  (attention masked to each slot's length), so sequences of different lengths share a step.

Rotary tables are computed once for every position with the model's own rotary module, so the
numbers match the ``transformers`` forward. A sequence holds at most the model's serving context
(:func:`tpm_faas.architectures.dims`: the sliding window where the model attends through one,
so full attention over the cache equals the model's windowed attention).

Every canonical hook site (:mod:`tpm_faas.sites`) is a point of the loop below where a *tap*
may read or rewrite the activations: a prompt's :class:`~.interventions.Program` at prefill,
the per-slot affine buffers of :class:`~.interventions.SlotInterventions` at decode. Without
interventions there is no tap and the loop is the plain forward pass.

On CUDA the decode step runs as a captured CUDA graph per batch bucket (1, 2, 4, ... slots):
:meth:`Decoder.decode_dense` has static shapes (slots ``0..B-1``, attention over the whole
cache, masked per slot), so a graph captured once is replayed with new tokens and positions
copied into its input buffers. Rows of idle slots in the bucket compute garbage that nobody
reads: a slot's positions are always written (prefill, then each decode) before they are read.
On CPU the dynamic :meth:`Decoder.decode` (attention only up to the longest sequence) is faster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tpm_faas.architectures import dims
from tpm_faas.runtime.arch import arch_for
from tpm_faas.runtime.interventions import (
    Compiler,
    Heads,
    Program,
    SlotInterventions,
    Tap,
    encode_tensor,
    lens_tables,
    saved_values,
)
from tpm_faas.sites import BLOCK_SITES, READ_ONLY_SITES, ModelShape, Site

#: CUDA graphs a decoder keeps (one per batch bucket and set of intervention sites).
MAX_GRAPHS = 32
EMBED, LN_FINAL, UNEMBED = Site(-1, "embed"), Site(-1, "ln_final"), Site(-1, "unembed")
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Decoder:
    """Prefill and batched decode, with interventions, for a model of a served architecture.

    :param model: the (possibly AutoTP-sharded) ``*ForCausalLM`` module
    :param slots: concurrent sequences the cache holds (the largest decode batch)
    :param max_len: tokens per sequence (prompt + generated); cut to the model's serving
        context (``max_position_embeddings``, or the sliding window where there is one)
    :param heads: this rank's share of the attention heads (all of them by default)
    :param gather_heads: joins a per-head tensor's heads from every rank (tensor parallel)
    :param rank: results are encoded on rank 0 only
    """

    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        max_len: int,
        cuda_graphs: bool | None = None,
        heads: Heads | None = None,
        gather_heads: Callable[[torch.Tensor], torch.Tensor] | None = None,
        rank: int = 0,
    ) -> None:
        config = model.config.to_dict()
        max_len = min(max_len, dims(config).context_length)
        #: The sites the gateway knows this model by (MoE sites at its MoE layers).
        self.shape = ModelShape.from_config(config)
        self.arch = arch = arch_for(model, max_len)
        self.model = model
        self.n_layers = len(arch.blocks)
        self.head_dim = arch.head_dim
        self.q_heads, self.kv_heads = arch.q_heads, arch.kv_heads
        self.heads = heads or Heads(0, arch.q_heads, arch.q_heads)
        self.gather_heads = gather_heads or (lambda t: t)
        self.rank = rank
        self.slots = slots
        self.max_len = max_len
        self.dtype, self.device = arch.dtype, arch.device
        self.v_head_dim = arch.v_head_dim
        shape = (self.n_layers, slots, self.kv_heads, max_len)
        self.k_cache = torch.zeros((*shape, self.head_dim), dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros((*shape, self.v_head_dim), dtype=self.dtype, device=self.device)
        self._arange = torch.arange(max_len, device=self.device)
        self._sites = [tuple(Site(i, k) for k in BLOCK_SITES) for i in range(self.n_layers)]
        # A mixture of experts runs the experts its tokens chose (data-dependent shapes, host
        # synchronisation): no CUDA graph captures that loop, so its decode runs eagerly.
        default_graphs = self.device.type == "cuda" and not arch.moe_layers
        self.cuda_graphs = default_graphs if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple[int, frozenset[Site], frozenset[Site]], _Graph] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.iv = SlotInterventions(slots, self.device, self.dtype)
        #: Requests with interventions: their compiler and each prompt's program.
        self._requests: dict[Any, tuple[Compiler, dict[int, Program]]] = {}

    def site_shape(self, site: Site) -> list[int]:
        """This rank's per-token shape of ``site`` (its own heads for ``attn.hook_z``)."""
        if site.per_head:
            return [self.q_heads, self.v_head_dim]
        if site.kind == "mlp.hook_router_logits":
            return [self.arch.num_experts]
        if site.kind in READ_ONLY_SITES:
            return [self.arch.top_k]
        if site.kind == "unembed":
            return [int(self.arch.lm_head.weight.shape[0])]
        return [self.arch.d_model]

    def has_site(self, site: Site) -> bool:
        """Whether this model has block site ``site`` (MoE sites at MoE layers only)."""
        return 0 <= site.layer < self.n_layers and site.kind in self.shape.block_sites(site.layer)

    @torch.inference_mode()
    def run_plan(self, plan: dict[str, Any]) -> Any:
        """Run one scheduler plan on this rank: ``prefill`` (of one prompt into a slot, with
        its request's interventions), ``decode`` (one token for some slots) or ``release``
        (collect and forget a request's interventions)."""
        op = plan["op"]
        if op == "prefill":
            prog = None
            iv = plan.get("iv")
            if iv is not None:
                prog = self._program(iv, list(plan["ids"]))
            return self.prefill(int(plan["slot"]), list(plan["ids"]), prog)
        if op == "decode":
            return self.decode(plan["slots"], plan["tokens"], plan["positions"])
        if op == "release":
            return self.release(plan["request"])
        raise ValueError(f"unknown plan {op!r}")

    def _program(self, iv: dict[str, Any], ids: list[int]) -> Program:
        key = iv["request"]
        if key not in self._requests:
            compiler = Compiler(
                iv["spec"],
                heads=self.heads,
                device=self.device,
                dtype=self.dtype,
                site_shape=self.site_shape,
                stash={},
                n_layers=self.n_layers,
                has_site=self.has_site,
            )
            self._requests[key] = (compiler, {})
        compiler, programs = self._requests[key]
        prog = programs[int(iv["index"])] = compiler.program(int(iv["index"]), ids)
        return prog

    # -- the steps -------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], prog: Program | None = None) -> torch.Tensor:
        """Run a prompt into ``slot`` (overwriting it) under ``prog``'s interventions; returns
        the last position's logits ``[1, vocab]``."""
        n = len(ids)
        if not 0 < n <= self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit a cache of {self.max_len}")
        self.iv.clear(slot)
        positions = self._arange[:n][None]
        tap = prog.tap if prog is not None else None
        x = self.arch.embed(torch.tensor([ids], device=self.device), positions)
        if tap is not None:
            x = tap(EMBED, x)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.k_cache[i, slot, :, :n] = k[0]
            self.v_cache[i, slot, :, :n] = v[0]
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.arch.scaling, enable_gqa=True
            )

        x = self._blocks(x, self.arch.rope(positions), attend, tap)
        if prog is not None and prog.needs_final:
            logits = self._final(x, tap)[:, -1]
        else:
            logits = self._final(x[:, -1:], None)[:, 0]
        if prog is not None:
            self.iv.install(slot, prog, self.site_shape)
        return logits

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each slot, at that slot's position; returns logits ``[len(slots), V]``."""
        writes, reads = self.iv.active(slots)
        if self.cuda_graphs:
            return self._decode_graph(slots, tokens, positions, writes, reads)
        b = len(slots)
        pos = torch.tensor(positions, device=self.device)
        width = max(positions) + 1
        idx = torch.tensor(slots, device=self.device)
        tap: Tap | None = None
        seen: dict[Site, torch.Tensor] = {}
        if writes or reads:
            tap, seen = self.iv.tap(idx, writes, reads)
        x = self.arch.embed(torch.tensor(tokens, device=self.device)[:, None], pos[:, None])
        if tap is not None:
            x = tap(EMBED, x)
        # Each slot attends to its own prefix: keys at positions <= its own. When every slot
        # is at the same position (always at batch 1) that is the whole width: no mask.
        mask: torch.Tensor | None = None
        if min(positions) != max(positions):
            mask = (torch.arange(width, device=self.device)[None] <= pos[:, None])[:, None, None]
        contiguous = slots == list(range(slots[0], slots[0] + b))
        one = (slots[0], positions[0]) if b == 1 else None

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if one is not None:  # plain indexing: a copy, no index_put
                self.k_cache[i, one[0], :, one[1]] = k[0, :, 0]
                self.v_cache[i, one[0], :, one[1]] = v[0, :, 0]
            else:
                self.k_cache[i, idx, :, pos] = k[:, :, 0]
                self.v_cache[i, idx, :, pos] = v[:, :, 0]
            if contiguous:  # a view, no gather
                keys = self.k_cache[i, slots[0] : slots[0] + b, :, :width]
                values = self.v_cache[i, slots[0] : slots[0] + b, :, :width]
            else:
                keys = self.k_cache[i, idx, :, :width]
                values = self.v_cache[i, idx, :, :width]
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.arch.scaling, enable_gqa=True
            )

        x = self._blocks(x, self.arch.rope(pos[:, None]), attend, tap)
        logits = self._final(x, tap)[:, 0]
        if reads:
            self.iv.collect(slots, seen)
        return logits

    @torch.inference_mode()
    def decode_dense(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        writes: frozenset[Site] = frozenset(),
        reads: frozenset[Site] = frozenset(),
    ) -> tuple[torch.Tensor, dict[Site, torch.Tensor]]:
        """One token for each of slots ``0..B-1`` (``B = len(tokens)``), static shapes only.

        Every tensor's shape depends on ``B`` and ``max_len`` alone, and every op is a tensor
        op (no host synchronisation), so the step can be captured in a CUDA graph, the
        intervention writes at ``writes`` and reads at ``reads`` included. Returns the logits
        and the read sites' values ``[B, *shape]``.
        """
        b = tokens.shape[0]
        rows = self._arange[:b]
        tap: Tap | None = None
        seen: dict[Site, torch.Tensor] = {}
        if writes or reads:
            tap, seen = self.iv.tap(slice(0, b), writes, reads)
        x = self.arch.embed(tokens[:, None], positions[:, None])
        if tap is not None:
            x = tap(EMBED, x)
        mask = (self._arange[None] <= positions[:, None])[:, None, None]  # [b, 1, 1, max_len]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.k_cache[i, rows, :, positions] = k[:, :, 0]
            self.v_cache[i, rows, :, positions] = v[:, :, 0]
            return F.scaled_dot_product_attention(
                q,
                self.k_cache[i, :b],
                self.v_cache[i, :b],
                attn_mask=mask,
                scale=self.arch.scaling,
                enable_gqa=True,
            )

        x = self._blocks(x, self.arch.rope(positions[:, None]), attend, tap)
        return self._final(x, tap)[:, 0], seen

    def _decode_graph(
        self,
        slots: list[int],
        tokens: list[int],
        positions: list[int],
        writes: frozenset[Site],
        reads: frozenset[Site],
    ) -> torch.Tensor:
        bucket = 1
        while bucket < max(slots) + 1:
            bucket *= 2
        bucket = min(bucket, self.slots)
        key = (bucket, writes, reads)
        graph = self._graphs.pop(key, None)
        if graph is None:
            if len(self._graphs) >= MAX_GRAPHS:  # forget the least recently used
                del self._graphs[next(iter(self._graphs))]
            graph = _Graph(self, bucket, writes, reads)
        self._graphs[key] = graph  # most recently used last
        tok = torch.zeros(bucket, dtype=torch.long)
        pos = torch.zeros(bucket, dtype=torch.long)
        idx = torch.tensor(slots)
        tok[idx] = torch.tensor(tokens)
        pos[idx] = torch.tensor(positions)
        logits, seen = graph.run(tok, pos)
        rows = idx.to(self.device)
        if reads:
            self.iv.collect(slots, {s: v.index_select(0, rows) for s, v in seen.items()})
        return logits.index_select(0, rows)

    @torch.inference_mode()
    def release(self, request: Any, *, encode: bool = True) -> list[dict[str, Any]] | None:
        """Collect a request's saved values and logit-lens tables (per prompt, on rank 0; as
        JSON payloads unless ``encode`` is false), clear the generation-time interventions of
        the slots its prompts used and forget it. Every rank calls this (gathering per-head
        values is a collective)."""
        entry = self._requests.pop(request, None)
        if entry is None:
            return None
        _, programs = entry
        mine = {id(p) for p in programs.values()}
        for slot in [k for k, p in self.iv.programs.items() if id(p) in mine]:
            self.iv.clear(slot)
        out: list[dict[str, Any]] = []
        for index in sorted(programs):
            prog = programs[index]
            saved = saved_values(prog, self.gather_heads)
            lens = lens_tables(prog, self._lens_logits)
            out.append({"index": index, "saved": saved, "logit_lens": lens})
        if self.rank != 0:
            return None
        for item in out if encode else ():
            for entry_ in item["saved"].values():
                entry_["tensor"] = encode_tensor(entry_["tensor"])
        return out

    # -- pieces ----------------------------------------------------------------------------
    def _blocks(self, x: torch.Tensor, rope: Any, attend: Attend, tap: Tap | None) -> torch.Tensor:
        arch = self.arch
        for i in range(self.n_layers):
            pre, z_site, attn_site, mid, mlp_site, post = self._sites[i]
            if tap is not None:
                x = tap(pre, x)
            q, k, v = arch.qkv(i, x, rope)
            z = attend(i, q, k, v).transpose(1, 2)  # [b, t, heads, v_head_dim]
            if tap is not None:
                z = tap(z_site, z)
            a = arch.attn_out(i, z)
            if tap is not None:
                a = tap(attn_site, a)
            x = x + a
            if tap is not None:
                x = tap(mid, x)
            m = arch.mlp(i, x, tap)
            if tap is not None:
                m = tap(mlp_site, m)
            x = x + m
            if tap is not None:
                x = tap(post, x)
        return x

    def _final(self, x: torch.Tensor, tap: Tap | None) -> torch.Tensor:
        h = self.arch.norm(x)
        if tap is not None:
            h = tap(LN_FINAL, h)
        logits = self.arch.unembed(h)
        if tap is not None:
            logits = tap(UNEMBED, logits)
        return logits

    def _lens_logits(self, resid: torch.Tensor) -> torch.Tensor:
        h = resid.to(self.device, self.dtype)[None]  # AutoTP's lm_head wants 3-D
        return self.arch.unembed(self.arch.norm(h))[0]


class _Graph:
    """A CUDA graph of :meth:`Decoder.decode_dense` for one batch bucket and one set of
    intervention sites (their values live in buffers the graph reads at each replay)."""

    def __init__(
        self, dec: Decoder, bucket: int, writes: frozenset[Site], reads: frozenset[Site]
    ) -> None:
        self.tokens = torch.zeros(bucket, dtype=torch.long, device=dec.device)
        self.positions = torch.zeros(bucket, dtype=torch.long, device=dec.device)
        # The warm-up runs really and writes keys and values at position 0 of slots
        # 0..bucket-1, which running sequences own: keep them and put them back.
        k0 = dec.k_cache[:, :bucket, :, 0].clone()
        v0 = dec.v_cache[:, :bucket, :, 0].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (allocator, kernels) off the capture
            for _ in range(2):
                dec.decode_dense(self.tokens, self.positions, writes, reads)
        torch.cuda.current_stream().wait_stream(stream)
        dec.k_cache[:, :bucket, :, 0] = k0
        dec.v_cache[:, :bucket, :, 0] = v0
        self.graph = torch.cuda.CUDAGraph()
        # One memory pool for all of a decoder's graphs: they replay one at a time, and their
        # outputs are copied out right after each replay.
        with torch.cuda.graph(self.graph, pool=dec.graph_pool):
            self.logits, self.seen = dec.decode_dense(self.tokens, self.positions, writes, reads)

    def run(
        self, tokens: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, dict[Site, torch.Tensor]]:
        self.tokens.copy_(tokens, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.graph.replay()
        return self.logits, self.seen
