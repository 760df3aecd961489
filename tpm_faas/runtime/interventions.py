"""Executing a normalised intervention spec inside the serving decoder.

The gateway (:mod:`tpm_faas.modes.intervene`) has already checked and priced the spec; here
it is compiled, on every rank, into a :class:`Program` per prompt:

* **prompt (prefill) actions**, per site in op order: writes (``set``, ``add``, ``ablate``,
  ``patch``, ``scale_heads``, ``drop_experts``: a ``-inf`` router logit) are indexed tensor
  ops on the site's activations; reads (``save``, the logit lens, a ``patch`` source) copy
  the selected rows into buffers allocated when the program is compiled (pinned host memory,
  filled on a side stream, on CUDA);
* **generation actions** (ops with ``generation: true``): every write op is an affine map
  ``x * m + a`` of one token's activations, so a slot's writes at a site compose into one
  ``(m, a)`` pair held in preallocated per-slot buffers (:class:`SlotInterventions`). The
  decode step applies ``x * M[rows] + A[rows]`` at each active site: a tensor op with static
  shapes that a CUDA graph captures, and that leaves rows of other requests unchanged
  (their ``m`` is 1 and ``a`` is 0).

Under tensor parallelism ``attn.hook_z`` is split by heads: a rank applies an op to the heads it
holds, and saved ``z`` values are gathered from every rank when the request is collected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tpm_faas.errors import RequestError, TensorError
from tpm_faas.protocol import codec
from tpm_faas.sites import ALL_BLOCK_SITES, BLOCK_SITES, GLOBAL_SITES, Site

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}

Tap = Callable[[Site, torch.Tensor], torch.Tensor]
SITE_KINDS = frozenset((*ALL_BLOCK_SITES, *GLOBAL_SITES))


def decode_tensor(payload: dict[str, Any]) -> torch.Tensor:
    """A tensor from its JSON payload (the wire's codec, :mod:`tpm_faas.protocol.codec`)."""
    dtype = DTYPES.get(payload["dtype"])
    if dtype is None:
        raise TensorError(f"unsupported dtype {payload['dtype']!r}")
    buf = codec.raw(payload)  # checked against the declaration; never a pickle
    return torch.frombuffer(bytearray(buf), dtype=dtype).reshape(payload["shape"]).clone()


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as a float32 JSON payload (the wire's codec)."""
    t = t.detach().to(torch.float32).contiguous().cpu()
    return codec.encode(t.numpy().tobytes(), "float32", list(t.shape))


def site_of(name: str) -> Site:
    """The :class:`Site` of a canonical name the gateway has already validated."""
    if name in GLOBAL_SITES:
        return Site(-1, name)
    try:
        _, layer, kind = name.split(".", 2)
        return Site(int(layer), kind)
    except ValueError:
        raise RequestError(f"unknown hook site {name!r}") from None


@dataclass(frozen=True)
class Heads:
    """This rank's share of the attention heads: global heads ``first .. first + count - 1``."""

    first: int
    count: int
    total: int

    def local(self, heads: list[int] | None) -> tuple[list[int], list[int]]:
        """For global ``heads`` (``None``: all): (indices into this rank's heads, indices into
        ``heads`` of those same heads)."""
        wanted = list(range(self.total)) if heads is None else heads
        pairs = [
            (h - self.first, j) for j, h in enumerate(wanted) if 0 <= h - self.first < self.count
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]


class _Capture:
    """Rows read from the forward pass, in a buffer allocated up front.

    On CUDA the buffer is pinned host memory filled on a side stream, so the copy overlaps the
    rest of the forward pass instead of stalling it; :meth:`value` waits for the copies.
    """

    def __init__(self, rows: int, shape: list[int], device: torch.device, side: Any) -> None:
        pinned = device.type == "cuda"
        self.buf = torch.empty([rows, *shape], dtype=torch.float32, pin_memory=pinned)
        self.n = 0
        self.side = side
        self.events: list[Any] = []

    def put(self, rows: torch.Tensor) -> None:
        k = rows.shape[0]
        if self.n + k > self.buf.shape[0]:
            raise RuntimeError("capture buffer overflow")
        dst = self.buf[self.n : self.n + k]
        self.n += k
        if rows.is_cuda:
            src = rows.detach()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                dst.copy_(src, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.side)
            src.record_stream(self.side)
            self.events.append(ev)
        else:
            dst.copy_(rows)

    def value(self) -> torch.Tensor:
        for ev in self.events:
            ev.synchronize()
        self.events.clear()
        return self.buf[: self.n]


@dataclass
class _Save:
    """The merged saves of one site: prompt positions and heads (each the union over the
    saves, in the order of first appearance; ``None`` heads: every head, in order), and
    whether generated tokens are saved too; its buffers are allocated once the program is
    compiled."""

    positions: list[int]
    heads: list[int] | None
    generate: bool = False
    capture: _Capture | None = None
    generated: _Capture | None = None

    def merge(self, positions: list[int], heads: list[int] | None, total: int) -> None:
        """Add another save's ``positions`` and ``heads`` (of ``total`` heads) after the ones
        already there."""
        self.positions = _union(self.positions, positions)
        if self.heads is not None or heads is not None:
            every = list(range(total))
            self.heads = _union(every if self.heads is None else self.heads, heads or every)
            if self.heads == every:
                self.heads = None


def _union(a: list[int], b: list[int]) -> list[int]:
    """``a``, then what of ``b`` is not in it, in order."""
    return list(dict.fromkeys([*a, *b]))


@dataclass(frozen=True)
class _GenWrite:
    """A write op that also acts on every generated token: ``x -> x * m + a`` on ``heads``."""

    index: int
    op: dict[str, Any]
    value: torch.Tensor | None
    heads: torch.Tensor | None


@dataclass
class Program:
    """One prompt's interventions on this rank.

    At each site its writes apply first, in op order; then its reads see the result (the
    value that flows on through the model).
    """

    ids: list[int]
    writes: dict[Site, list[Callable[[torch.Tensor], torch.Tensor]]] = field(default_factory=dict)
    reads: dict[Site, list[Callable[[torch.Tensor], None]]] = field(default_factory=dict)
    saves: dict[Site, _Save] = field(default_factory=dict)
    lens: list[tuple[Site, list[int], int, _Capture]] = field(default_factory=list)
    gen_writes: dict[Site, list[_GenWrite]] = field(default_factory=dict)
    #: Means taken by ``ablate`` (``method: mean``) at the prompt, reused while generating.
    means: dict[tuple[int, Site], torch.Tensor] = field(default_factory=dict)

    @property
    def needs_final(self) -> bool:
        """Whether ``ln_final`` or ``unembed`` is touched at prompt tokens."""
        return any(s.kind in ("ln_final", "unembed") for s in (*self.writes, *self.reads))

    @property
    def gen_reads(self) -> set[Site]:
        return {s for s, sv in self.saves.items() if sv.generated is not None}

    def tap(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        for write in self.writes.get(site, ()):
            x = write(x)
        for read in self.reads.get(site, ()):
            read(x)
        return x


class Compiler:
    """Builds the :class:`Program` of each prompt of one request on one rank.

    :param site_shape: this rank's per-token shape of a site (its share of the heads for z)
    :param stash: rows a patch source saved for its targets, kept by the caller for the
        request's lifetime
    """

    def __init__(
        self,
        spec: dict[str, Any],
        *,
        heads: Heads,
        device: torch.device,
        dtype: torch.dtype,
        site_shape: Callable[[Site], list[int]],
        stash: dict[tuple[int, Site], torch.Tensor],
        n_layers: int,
        has_site: Callable[[Site], bool] | None = None,
    ) -> None:
        self.spec = spec
        self.n_layers = n_layers
        self.has_site = has_site or (lambda s: s.kind in BLOCK_SITES and 0 <= s.layer < n_layers)
        self.heads = heads
        self.device, self.dtype = device, dtype
        self.site_shape = site_shape
        self.stash = stash
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.max_new = int(spec.get("max_new_tokens", 0))
        self.tensors = {}
        for name, payload in spec.get("tensors", {}).items():
            t = decode_tensor(payload)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise TensorError(f"tensor {name!r} holds NaN or infinite values")
            self.tensors[name] = t.to(device=device, dtype=dtype)

    def program(self, index: int, ids: list[int]) -> Program:
        self._check()
        prog = Program(ids)
        for k, op in enumerate(self.spec["ops"]):
            if op["op"] == "patch" and op["source"] == index:
                _in_prompt(op["source_positions"], len(ids), k)
                for name in op["sites"]:
                    self._stash(prog, k, site_of(name), op["source_positions"])
            if index in op["prompts"]:
                pos = op["positions"][op["prompts"].index(index)]
                _in_prompt(pos, len(ids), k)
                for name in op["sites"]:
                    self._compile(prog, k, op, site_of(name), pos)
        for site, sv in prog.saves.items():  # buffers for the merged saves of each site
            shape = self.site_shape(site)
            sv.capture = _Capture(len(sv.positions), shape, self.device, self.side)
            if sv.generate:
                sv.generated = _Capture(self.max_new, shape, self.device, self.side)
        return prog

    def _check(self) -> None:
        """What this module indexes is checked again here, whoever sent the spec."""
        dropped: dict[Site, set[int]] = {}
        for k, op in enumerate(self.spec["ops"]):
            for name in op["sites"]:
                site = site_of(name)
                if site.kind in GLOBAL_SITES:
                    ok = site.layer == -1
                else:
                    ok = site.kind in SITE_KINDS and self.has_site(site)
                if not ok:
                    raise RequestError(f"ops[{k}]: no hook site {name!r} in this model")
                if site.read_only and op["op"] not in ("save",):
                    raise RequestError(f"ops[{k}]: {name!r} is read only")
                if op["op"] == "drop_experts":
                    n = self.site_shape(site)[-1]
                    experts = op.get("experts") or []
                    if site.kind != "mlp.hook_router_logits" or not experts:
                        raise RequestError(f"ops[{k}]: drop_experts acts on router logits")
                    if any(not 0 <= e < n for e in experts):
                        raise RequestError(f"ops[{k}]: an expert is out of range (there are {n})")
                    union = dropped.setdefault(site, set())
                    union.update(experts)
                    if (
                        len(union)
                        > n - self.site_shape(Site(site.layer, "mlp.hook_expert_indices"))[0]
                    ):
                        raise RequestError(f"ops[{k}]: too many experts dropped at {name!r}")
            heads = op.get("heads") or []
            if any(not 0 <= h < self.heads.total for h in heads):
                raise RequestError(f"ops[{k}]: a head is out of range")

    def _compile(
        self, prog: Program, k: int, op: dict[str, Any], site: Site, pos: list[int]
    ) -> None:
        kind = op["op"]
        if kind == "save":
            sv = prog.saves.get(site)
            if sv is None:  # rows in the order asked
                heads = None if op["heads"] is None else _union(op["heads"], [])
                sv = prog.saves[site] = _Save(_union(pos, []), heads)
                prog.reads.setdefault(site, []).append(self._read_save(sv))
            else:  # several saves of one site: one capture of the union
                sv.merge(pos, op["heads"], self.heads.total)
            sv.generate = sv.generate or bool(op["generation"])
            return
        shape = self.site_shape(site)
        idx = torch.tensor(pos, device=self.device)
        if kind == "logit_lens":
            cap = _Capture(len(pos), shape, self.device, self.side)
            prog.lens.append((site, pos, int(op["top_k"]), cap))
            prog.reads.setdefault(site, []).append(
                lambda x: cap.put(x[0].index_select(0, idx).float())
            )
            return
        local, picked = self.heads.local(op["heads"]) if site.per_head else ([], [])
        if site.per_head and not local:  # none of the op's heads is on this rank
            if op["generation"]:
                # Still an active site here (identity m, a): every rank must see the same
                # active sites, which key the decode step's CUDA graphs.
                prog.gen_writes.setdefault(site, [])
            return
        hsel = torch.tensor(local, device=self.device) if site.per_head else None
        value = None
        if kind in ("set", "add"):
            value = self.tensors[op["value"]] * float(op["scale"])
            if hsel is not None:  # the value's rows for this rank's heads
                value = value.index_select(
                    value.dim() - 2, torch.tensor(picked, device=self.device)
                )
        prog.writes.setdefault(site, []).append(self._write(prog, k, op, site, idx, hsel, value))
        if op["generation"]:
            prog.gen_writes.setdefault(site, []).append(_GenWrite(k, op, value, hsel))

    def _write(
        self,
        prog: Program,
        k: int,
        op: dict[str, Any],
        site: Site,
        idx: torch.Tensor,
        hsel: torch.Tensor | None,
        value: torch.Tensor | None,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        kind = op["op"]

        def run(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()  # never write into a tensor the model may still hold
            rows = x[0].index_select(0, idx)  # [positions, *shape]
            cur = rows if hsel is None else rows.index_select(1, hsel)
            if kind == "set":
                assert value is not None
                new = value.expand_as(cur)
            elif kind == "add":
                assert value is not None
                new = cur + value
            elif kind == "scale_heads":
                new = cur * float(op["scale"])
            elif kind == "ablate" and op["method"] == "zero":
                new = torch.zeros_like(cur)
            elif kind == "ablate":
                every = x[0] if hsel is None else x[0].index_select(1, hsel)
                mean = prog.means[(k, site)] = every.mean(0)
                new = mean.expand_as(cur)
            elif kind == "patch":
                src = self.stash[(k, site)]
                new = src if hsel is None else src.index_select(1, hsel)
            elif kind == "drop_experts":  # never chosen: the routing passes over them
                experts = torch.tensor(op["experts"], device=cur.device)
                new = cur.index_fill(-1, experts, float("-inf"))
            else:
                raise RequestError(f"unknown intervention op {kind!r}")
            if hsel is not None:
                new = rows.index_copy(1, hsel, new.to(x.dtype))
            x[0].index_copy_(0, idx, new.to(x.dtype))
            return x

        return run

    def _read_save(self, sv: _Save) -> Callable[[torch.Tensor], None]:
        idx: list[torch.Tensor] = []  # built once, at the first read (positions are final)

        def run(x: torch.Tensor) -> None:
            assert sv.capture is not None
            if not idx:
                idx.append(torch.tensor(sv.positions, device=self.device))
            sv.capture.put(x[0].index_select(0, idx[0]).float())

        return run

    def _stash(self, prog: Program, k: int, site: Site, pos: list[int]) -> None:
        idx = torch.tensor(pos, device=self.device)

        def run(x: torch.Tensor) -> None:
            self.stash[(k, site)] = x[0].index_select(0, idx).clone()

        prog.reads.setdefault(site, []).append(run)


def _in_prompt(positions: list[int], n: int, k: int) -> None:
    if any(not 0 <= p < n for p in positions):
        raise RequestError(f"ops[{k}]: a position is out of range for a prompt of {n} tokens")


class SlotInterventions:
    """Generation-time interventions of every slot: per-site affine buffers and read lists.

    ``M[site]`` and ``A[site]`` are ``[slots, *shape]``, allocated the first time a site is
    used and kept (a CUDA graph captured over them stays valid); a slot without a write at a
    site has ``m = 1`` and ``a = 0`` there.
    """

    def __init__(self, slots: int, device: torch.device, dtype: torch.dtype) -> None:
        self.slots, self.device, self.dtype = slots, device, dtype
        self.M: dict[Site, torch.Tensor] = {}
        self.A: dict[Site, torch.Tensor] = {}
        self.C: dict[Site, torch.Tensor] = {}  # static read buffers of the graph path
        self.writes: dict[int, set[Site]] = {}
        self.programs: dict[int, Program] = {}

    def install(self, slot: int, prog: Program, site_shape: Callable[[Site], list[int]]) -> None:
        """Set ``slot``'s buffers from ``prog``'s generation-time ops (after its prefill)."""
        self.clear(slot)
        for site, ops in prog.gen_writes.items():
            if site not in self.M:
                shape = [self.slots, *site_shape(site)]
                self.M[site] = torch.ones(shape, dtype=self.dtype, device=self.device)
                self.A[site] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            m, a = self.M[site][slot], self.A[site][slot]
            for w in ops:
                _compose(m, a, w, prog.means.get((w.index, site)))
            self.writes.setdefault(slot, set()).add(site)
        if prog.gen_writes or prog.gen_reads:
            self.programs[slot] = prog

    def clear(self, slot: int) -> None:
        for site in self.writes.pop(slot, ()):
            self.M[site][slot] = 1
            self.A[site][slot] = 0
        self.programs.pop(slot, None)

    def active(self, slots: list[int]) -> tuple[frozenset[Site], frozenset[Site]]:
        """Sites written and sites read at generated tokens by any of ``slots``."""
        w: set[Site] = set()
        r: set[Site] = set()
        for s in slots:
            w |= self.writes.get(s, set())
            if s in self.programs:
                r |= self.programs[s].gen_reads
        return frozenset(w), frozenset(r)

    def tap(
        self, rows: torch.Tensor | slice, writes: frozenset[Site], reads: frozenset[Site]
    ) -> tuple[Tap, dict[Site, torch.Tensor]]:
        """The decode step's tap over batch ``rows`` (slot indices, or a slice ``:b``), and
        the dict its reads fill (site -> ``[b, *shape]``)."""
        seen: dict[Site, torch.Tensor] = {}

        def tap(site: Site, x: torch.Tensor) -> torch.Tensor:  # x: [b, 1, *shape]
            if site in writes:
                x = x * self.M[site][rows].unsqueeze(1) + self.A[site][rows].unsqueeze(1)
            if site in reads:
                seen[site] = x[:, 0]
            return x

        return tap, seen

    def collect(self, slots: list[int], seen: dict[Site, torch.Tensor]) -> None:
        """Append each reading slot's row of a decode step to its captures."""
        for row, slot in enumerate(slots):
            prog = self.programs.get(slot)
            if prog is None:
                continue
            for site in prog.gen_reads:
                cap = prog.saves[site].generated
                assert cap is not None
                if cap.n < cap.buf.shape[0]:
                    cap.put(seen[site][row : row + 1].float())


def _compose(m: torch.Tensor, a: torch.Tensor, w: _GenWrite, mean: torch.Tensor | None) -> None:
    """``(m, a) <- (m * m_w, a * m_w + a_w)``: apply write ``w`` after the ones before it."""
    mm, aa = (m, a) if w.heads is None else (m[w.heads], a[w.heads])
    kind = w.op["op"]
    if kind == "add":
        assert w.value is not None
        aa = aa + w.value
    elif kind == "set":
        assert w.value is not None
        mm, aa = torch.zeros_like(mm), w.value.expand_as(aa).clone()
    elif kind == "scale_heads":
        s = float(w.op["scale"])
        mm, aa = mm * s, aa * s
    elif kind == "ablate":
        mm = torch.zeros_like(mm)
        aa = torch.zeros_like(aa) if mean is None else mean.to(aa.dtype).expand_as(aa).clone()
    elif kind == "drop_experts":  # x * m + (-inf): the logit of a dropped expert, every step
        experts = torch.tensor(w.op["experts"], device=aa.device)
        aa = aa.index_fill(-1, experts, float("-inf"))
    else:
        raise RequestError(f"{kind!r} does not act on generated tokens")
    if w.heads is None:
        m.copy_(mm)
        a.copy_(aa)
    else:
        m[w.heads] = mm
        a[w.heads] = aa


def lens_tables(
    prog: Program, logits: Callable[[torch.Tensor], torch.Tensor]
) -> list[dict[str, Any]]:
    """The logit-lens rows of ``prog`` (``logits`` maps residuals to logits on every rank).

    Tokens are ids here (``input_token`` and each entry's ``token``); rank 0's scheduler, which
    holds the model's tokenizer, replaces them by their text (:func:`name_lens_tokens`)."""
    table = []
    for site, pos, top_k, cap in prog.lens:
        probs = torch.softmax(logits(cap.value()).float(), dim=-1)
        top = torch.topk(probs, top_k, dim=-1)
        for j, p in enumerate(pos):
            table.append(
                {
                    "site": site.name,
                    "layer": site.layer,
                    "position": p,
                    "input_token": prog.ids[p],
                    "top": [
                        {"token": int(t), "id": int(t), "prob": round(float(q), 6)}
                        for t, q in zip(
                            top.indices[j].tolist(), top.values[j].tolist(), strict=True
                        )
                    ],
                }
            )
    return table


def name_lens_tokens(rows: list[dict[str, Any]], token_str: Callable[[int], str]) -> None:
    """Replace the token ids of :func:`lens_tables`' rows by ``token_str`` of them, in place
    (keys keep their order: the rows' JSON is priced in that order)."""
    for row in rows:
        row["input_token"] = token_str(int(row["input_token"]))
        for entry in row["top"]:
            entry["token"] = token_str(int(entry["id"]))


def saved_values(
    prog: Program, gather_heads: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, dict[str, Any]]:
    """``{site name: {"positions", "heads"?, "tensor"}}`` of ``prog``'s saves, in site order.

    ``tensor`` is ``[rows, *shape]``: row ``j`` is the value at token position
    ``positions[j]``, first the prompt positions in the order asked (merged saves of a site:
    the union, in the order of first appearance over the ops), then, with ``generation``, one
    row per generated token that was fed through the model (positions ``n .. n + k - 2`` for
    a prompt of ``n`` tokens and ``k`` generated tokens: the last one is sampled, never fed).
    For ``attn.hook_z``, ``heads`` names the head of each index of the tensor's axis 1 (the
    order asked; every head in order when no save names heads).

    ``gather_heads`` joins the rank's heads of a ``z`` capture with every other rank's (a
    collective: every rank calls it for the same sites in the same order).
    """
    out: dict[str, dict[str, Any]] = {}
    n = len(prog.ids)
    for site in sorted(prog.saves):
        sv = prog.saves[site]
        assert sv.capture is not None
        parts = [sv.capture.value()]
        positions = list(sv.positions)
        if sv.generated is not None:
            rows = sv.generated.value()
            parts.append(rows)
            positions += list(range(n, n + rows.shape[0]))
        t = torch.cat(parts)
        if site.per_head:
            t = gather_heads(t)
            if sv.heads is not None:
                t = t[:, sv.heads]
        entry: dict[str, Any] = {"positions": positions, "tensor": t}
        if site.per_head:
            entry["heads"] = list(range(t.shape[1])) if sv.heads is None else list(sv.heads)
        out[site.name] = entry
    return out
