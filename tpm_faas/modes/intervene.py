"""Intermediary access: declarative reads and writes of hidden states at named hook sites.

:meth:`InterveneMode.admit` checks the spec against the model (sites, layers, heads,
positions, tensor shapes) and the caller's limits (ops, sites, write permission, bytes in and
out, sites touched) before anything runs, and normalises it (selectors expanded, negative
positions resolved, inline tensors moved into one table) so the shard group runs exactly what
was priced. Nothing here allocates a tensor: sizes come from the declarations.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

from tpm_faas.errors import PolicyDenied, RequestError, TensorError
from tpm_faas.modes import pricing
from tpm_faas.modes.base import (
    Admission,
    Mode,
    check_context,
    prompt_ids,
    sha256_json,
    tokenizer_for,
)
from tpm_faas.policy import Limits, Usage, check_limit
from tpm_faas.protocol.replies import InterveneOutput
from tpm_faas.protocol.requests import (
    WRITE_OPS,
    AblateOp,
    AddOp,
    DropExpertsOp,
    InterveneRequest,
    LogitLensOp,
    PatchOp,
    Range,
    ResultTensor,
    SaveOp,
    ScaleHeadsOp,
    SetOp,
    TensorPayload,
    TensorRef,
)
from tpm_faas.protocol.shard import InterveneBody
from tpm_faas.registry import ModelInfo
from tpm_faas.sites import ALL_BLOCK_SITES, MOE_SITES, ModelShape, Site, parse_site
from tpm_faas.tokenizer import Tokenizer

LENS_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def model_shape(model: ModelInfo) -> ModelShape:
    return ModelShape(
        architecture=model.architecture,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_heads=model.num_heads,
        head_dim=model.head_dim,
        vocab_size=model.vocab_size,
        num_experts=model.num_experts,
        experts_per_token=model.experts_per_token,
        moe_layers=tuple(model.moe_layers),
        shared_experts=model.shared_experts,
    )


def expand(
    sel: Any, n: int, what: str, where: str, *, ordered: bool = False, first: bool = False
) -> list[int]:
    """Indices a selector picks out of ``0..n-1`` (negative ones count from ``n``): sorted;
    with ``ordered`` (where rows of a tensor or of a patch source pair with them) in the
    order given, a repeat refused; with ``first`` (a save: its rows come back in the order
    asked) in the order given, a repeat dropped."""
    if sel is None or sel == "*":
        return list(range(n))
    raw = range(sel.start, sel.stop, sel.step) if isinstance(sel, Range) else sel
    out: list[int] = []
    for i in raw:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise RequestError(f"{where}: {what} {i} is out of range (there are {n})")
        out.append(j)
    if not out:
        raise RequestError(f"{where}: the {what} selector picks nothing")
    if ordered:
        if len(set(out)) != len(out):
            raise RequestError(f"{where}: the {what} selector picks a {what} twice")
        return out
    if first:
        return list(dict.fromkeys(out))
    return sorted(set(out))


def resolve_sites(site: str, layers: Any, m: ModelShape, where: str) -> list[Site]:
    """The sites an op's ``site`` and ``layers`` denote (``'*'`` of a MoE site: the layers
    that have it)."""
    if site in ALL_BLOCK_SITES:
        if layers is None:
            raise RequestError(
                f"{where}: block site {site!r} needs 'layers' (a list, range or '*')"
            )
        if site in MOE_SITES and layers == "*":
            picked = [i for i in range(m.num_layers) if site in m.block_sites(i)]
            if not picked:
                # The same message as a named layer would get (dense, or no shared expert).
                layers = [m.moe_layers[0] if m.moe_layers else 0]
            else:
                return [Site(i, site) for i in picked]
        out = []
        for i in expand(layers, m.num_layers, "layer", where):
            try:
                out.append(parse_site(f"blocks.{i}.{site}", m))
            except RequestError as e:
                raise RequestError(f"{where}: {e.message}") from None
        return out
    if layers is not None:
        raise RequestError(
            f"{where}: 'layers' goes with a block site ({', '.join(ALL_BLOCK_SITES)}), "
            f"not with {site!r}"
        )
    try:
        return [parse_site(site, m)]
    except RequestError as e:
        raise RequestError(f"{where}: {e.message}") from None


def _read_table(req: InterveneRequest) -> dict[str, TensorPayload]:
    """The request's ``tensors`` table, every entry a payload: references to earlier results
    (:class:`ResultTensor`) are read by the gateway before admission, at the site that holds
    the results."""
    table: dict[str, TensorPayload] = {}
    for name, t in req.tensors.items():
        if isinstance(t, ResultTensor):
            raise RequestError(
                f"tensors.{name}: refers to result {t.result!r}; only the gateway of the site "
                "that served it can read it"
            )
        table[name] = t
    return table


class _Spec:
    """The normalisation of one request: tensors, ops, sites, bytes."""

    def __init__(
        self,
        req: InterveneRequest,
        m: ModelShape,
        ids: list[list[int]],
        limits: Limits,
        tok: Tokenizer,
    ):
        self.req, self.m, self.ids, self.limits, self.tok = req, m, ids, limits, tok
        self.lengths = [len(i) for i in ids]
        self.table = _read_table(req)
        self.tensors: dict[str, dict[str, Any]] = {}
        self.ops: list[dict[str, Any]] = []
        self.sites: set[str] = set()
        self.in_bytes = sum(t.nbytes for t in self.table.values())
        self.saves: dict[tuple[int, str], dict[str, Any]] = {}
        #: Per prompt, the JSON size of each of its logit-lens rows (in no particular order).
        self.lens: dict[int, list[int]] = {}
        #: Experts knocked out per MoE layer, over every drop_experts op of the request.
        self.dropped: dict[str, set[int]] = {}

    def out_bytes(self) -> int:
        """The most the result's ``output`` may count as ``bytes_returned``::

            {"results":[<completion with "saved":{…},"logit_lens":[…]>,…]}

        with the merged saves of each prompt and site (:meth:`saved`) and, should the tensors
        go by reference, their keys and header entries and the results file's envelope."""
        saved = self.saved()
        data = sum(raw for _, _, raw in saved)
        extra = sum(pricing.by_reference_extra(path, shape, data) for path, shape, _ in saved)
        runs = []
        for p, n in enumerate(self.lengths):
            entries = [u["json"] for (q, _), u in self.saves.items() if q == p]
            members = 9 + pricing.list_json(entries)  # ,"saved":{…} (braces, commas)
            members += 14 + pricing.list_json(self.lens.get(p, []))  # ,"logit_lens":[…]
            runs.append(
                pricing.completion(
                    n, self.req.max_new_tokens, self.m.vocab_size, self.tok, extra=members
                )
            )
        total = 11 + pricing.list_json(runs) + 1
        if saved:
            total += extra + pricing.by_reference_envelope(self.req.request_id, data + extra)
        return total

    def saved(self) -> list[tuple[str, list[int], int]]:
        """The merged saves (:func:`tpm_faas.runtime.interventions.saved_values`): per prompt
        and site, the union of positions (plus the generated rows when any save of it asks)
        times the union of heads; sets each one's JSON size in the prompt's ``saved`` and
        returns (key in a results file, tensor shape, raw bytes) of each::

            "<site>":{"positions":[…],"tensor":<float32 [rows, …]>,"heads":[…]}

        A prompt that generates ``k <= max_new_tokens`` tokens returns ``k - 1`` generated
        rows, at positions ``n .. n + k - 2`` (the last token is sampled but never fed through
        the model), so at most ``max_new_tokens - 1``."""
        out = []
        for (p, name), u in self.saves.items():
            site: Site = u["site"]
            shape = site.shape(self.m)
            heads = sorted(u["heads"])
            if site.per_head:
                if -1 in u["heads"]:
                    heads = list(range(self.m.num_heads))
                shape = [len(heads), self.m.head_dim]
            n = self.lengths[p]
            gen = range(n, n + self.req.max_new_tokens - 1) if u["gen"] else range(0)
            positions = [*u["pos"], *gen]
            tshape = [len(positions), *shape]
            size = len(name) + 3  # "<site>":
            size += 13 + 2 + pricing.ints_json(positions)  # {"positions":[…]
            size += 10 + pricing.tensor_payload(tshape)  # ,"tensor":{…}
            if site.per_head:
                size += 9 + 2 + pricing.ints_json(heads)  # ,"heads":[…]
            u["json"] = size + 1  # }
            raw = math.prod(tshape) * pricing.BYTES_PER_VALUE
            out.append((f"results.{p}.saved.{name}.tensor", tshape, raw))
        return out

    def tensor(self, v: TensorPayload | TensorRef, name: str, where: str) -> TensorPayload:
        if isinstance(v, TensorRef):
            t = self.table.get(v.ref)
            if t is None:
                known = ", ".join(sorted(self.req.tensors)) or "none"
                raise RequestError(f"{where}: no tensor {v.ref!r} in 'tensors' (there: {known})")
            self.tensors[v.ref] = t.model_dump()
            return t
        self.in_bytes += v.nbytes
        self.tensors[name] = v.model_dump()
        return v

    def add(self, i: int, op: Any) -> None:
        where = f"ops[{i}] ({op.op})"
        lim, m, req = self.limits, self.m, self.req
        if op.op not in lim.allowed_ops:
            raise PolicyDenied(f"{where}: the {op.op!r} operation is not allowed for your group")
        if op.op in WRITE_OPS and not lim.write:
            raise PolicyDenied(f"{where}: your group may read hidden states but not write them")
        layers = op.layers
        if isinstance(op, DropExpertsOp) and layers is None and op.site in ALL_BLOCK_SITES:
            layers = "*"  # a knock-out names its layers, or acts at every MoE layer
        sites = resolve_sites(op.site, layers, m, where)
        if op.op in WRITE_OPS and sites[0].read_only:
            raise RequestError(
                f"{where}: {sites[0].kind!r} is read only (the routing's outcome); write "
                "mlp.hook_router_logits, or drop experts there, to change it"
            )
        for s in sites:
            if not any(fnmatch.fnmatchcase(s.name, pat) for pat in lim.allowed_sites):
                raise PolicyDenied(f"{where}: hook site {s.name!r} is not allowed for your group")
        # Rows of a value tensor or of a patch source pair with positions and heads in the
        # order given; a save returns its rows in the order asked (repeats dropped); elsewhere
        # order does not matter.
        ordered = isinstance(op, (SetOp, AddOp, PatchOp))
        first = isinstance(op, SaveOp)
        targets = expand(op.prompts, len(self.ids), "prompt", where)
        positions = [
            expand(
                op.positions,
                self.lengths[p],
                "position",
                f"{where}, prompt {p}",
                ordered=ordered,
                first=first,
            )
            for p in targets
        ]
        per_head = sites[0].per_head
        if op.heads is not None and not per_head:
            raise RequestError(f"{where}: 'heads' selects heads of attn.hook_z, not of {op.site!r}")
        heads = (
            expand(op.heads, m.num_heads, "head", where, ordered=ordered, first=first)
            if per_head
            else None
        )
        token_shape = sites[0].shape(m)
        if heads is not None:
            token_shape = [len(heads), m.head_dim]
        norm: dict[str, Any] = {
            "op": op.op,
            "sites": [s.name for s in sites],
            "prompts": targets,
            "positions": positions,
            "heads": None if heads is None or heads == list(range(m.num_heads)) else heads,
            "generation": op.generation,
        }
        if op.generation and req.max_new_tokens == 0:
            raise RequestError(f"{where}: 'generation' needs max_new_tokens > 0")
        if isinstance(op, SaveOp):
            # Saves of one site and prompt are merged (the union of positions and heads, in
            # the order of first appearance; the runtime returns the ids beside the rows) and
            # priced as merged, in saved(): the order does not change the size.
            for s in sites:
                for p, pos in zip(targets, positions, strict=True):
                    u = self.saves.setdefault(
                        (p, s.name), {"pos": set(), "heads": set(), "gen": False, "site": s}
                    )
                    u["pos"].update(pos)
                    u["heads"].update(heads if heads is not None else [-1])
                    u["gen"] = u["gen"] or op.generation
        elif isinstance(op, LogitLensOp):
            if op.site not in LENS_SITES:
                raise RequestError(f"{where}: the logit lens reads {', '.join(LENS_SITES)}")
            if op.generation:
                raise RequestError(f"{where}: the logit lens reads prompt tokens only")
            # One row per site and position (lens_tables), each priced from its own site,
            # layer, position and input token.
            for p, pos in zip(targets, positions, strict=True):
                self.lens.setdefault(p, []).extend(
                    pricing.lens_row(
                        st.name, st.layer, j, self.ids[p][j], op.top_k, m.vocab_size, self.tok
                    )
                    for st in sites
                    for j in pos
                )
            norm["top_k"] = op.top_k
        elif isinstance(op, (SetOp, AddOp)):
            value = op.value if isinstance(op, SetOp) else op.vector
            inline = f"#ops.{i}.value"  # '#' is not allowed in a user's tensor name
            t = self.tensor(value, inline, where)
            if t.dtype not in FLOAT_DTYPES:
                raise TensorError(f"{where}: the tensor must be floating point, not {t.dtype}")
            n_pos = {len(p) for p in positions}
            per_pos = t.shape[1:] == token_shape and len(n_pos) == 1 and t.shape[0] in n_pos
            if t.shape != token_shape and not per_pos:
                raise TensorError(
                    f"{where}: the tensor has shape {t.shape}; {op.site!r} needs {token_shape} "
                    f"(one token) or [positions, *{token_shape}]"
                )
            if per_pos and op.generation:
                raise TensorError(
                    f"{where}: with 'generation' the tensor must be one token's shape {token_shape}"
                )
            norm["value"] = value.ref if isinstance(value, TensorRef) else inline
            norm["scale"] = op.scale if isinstance(op, AddOp) else 1.0
        elif isinstance(op, AblateOp):
            norm["method"] = op.method
        elif isinstance(op, PatchOp):
            if op.generation:
                raise RequestError(f"{where}: 'patch' acts on prompt tokens only")
            src = op.source
            if src >= len(self.ids):
                raise RequestError(f"{where}: source prompt {src} does not exist")
            # By default the same positions, resolved against the source prompt.
            src_sel = op.positions if op.source_positions is None else op.source_positions
            src_pos = expand(src_sel, self.lengths[src], "position", f"{where}, source")
            for p, pos in zip(targets, positions, strict=True):
                if p <= src:
                    raise RequestError(
                        f"{where}: prompt {p} cannot be patched from prompt {src}: the source "
                        "must come earlier in 'prompts'"
                    )
                if len(pos) != len(src_pos):
                    raise RequestError(
                        f"{where}: prompt {p} has {len(pos)} target positions but the source "
                        f"has {len(src_pos)}"
                    )
            norm["source"] = src
            norm["source_positions"] = src_pos
        elif isinstance(op, ScaleHeadsOp):
            if not per_head:
                raise RequestError(f"{where}: 'scale_heads' acts on attn.hook_z only")
            norm["scale"] = op.scale
        elif isinstance(op, DropExpertsOp):
            if sites[0].kind != "mlp.hook_router_logits":
                raise RequestError(f"{where}: 'drop_experts' acts on mlp.hook_router_logits")
            experts = sorted(set(op.experts))
            if experts[-1] >= m.num_experts:
                raise RequestError(
                    f"{where}: expert {experts[-1]} is out of range (there are {m.num_experts})"
                )
            for s in sites:  # with the request's other knock-outs at the same layer
                union = self.dropped.setdefault(s.name, set())
                union.update(experts)
                if len(union) > m.num_experts - m.experts_per_token:
                    raise RequestError(
                        f"{where}: dropping {len(union)} of {m.num_experts} experts at "
                        f"{s.name} leaves fewer than the {m.experts_per_token} each token is "
                        "routed to"
                    )
            norm["experts"] = experts
        self.sites.update(s.name for s in sites)
        self.ops.append(norm)


def intervene(request_json: str, token: str | None = None) -> str:
    """Read and write hidden states at hook sites.

    See :class:`tpm_faas.protocol.requests.InterveneRequest`.

    The function registered with Globus Compute for this mode (as source text: its body
    imports what it needs). JSON in, JSON out; never raises.
    """
    from tpm_faas.gateway.pipeline import handle

    return handle("intervene", request_json, token)


class InterveneMode(Mode):
    name = "intervene"
    function = staticmethod(intervene)
    scope_title = "Intermediary access"
    scope_description = (
        "Read and write the model's hidden states through declarative interventions."
    )
    summary = "prompts under declarative reads and writes of hidden states at named hook sites"
    request_model = InterveneRequest
    output_model = InterveneOutput
    shard_body = InterveneBody
    scheduled = True

    def admit(self, request: InterveneRequest, model: ModelInfo, limits: Limits) -> Admission:
        check_limit("prompts", request.n_inputs, limits.max_prompts)
        ids = prompt_ids(
            model,
            request.prompts,
            request.chats,
            add_generation_prompt=request.add_generation_prompt,
        )
        lengths = [len(i) for i in ids]
        check_limit("the longest prompt (tokens)", max(lengths), limits.max_prompt_tokens)
        check_limit("max_new_tokens", request.max_new_tokens, limits.max_new_tokens)
        check_context(model, max(lengths), request.max_new_tokens, limits)
        spec = _Spec(request, model_shape(model), ids, limits, tokenizer_for(model))
        for i, op in enumerate(request.ops):
            spec.add(i, op)
        out_bytes = spec.out_bytes()
        unused = set(request.tensors) - set(spec.tensors)
        if unused:
            raise RequestError(f"tensors {sorted(unused)} are not used by any op")
        check_limit("tensors sent (bytes)", spec.in_bytes, limits.max_input_bytes)
        check_limit("hook sites touched", len(spec.sites), limits.max_hook_sites)
        check_limit(
            "the result size this request may return (bytes)",
            out_bytes,
            limits.max_bytes_returned,
        )
        worst = Usage(
            input_tokens=sum(lengths),
            output_tokens=request.max_new_tokens * len(ids),
            bytes_returned=out_bytes,
            hooked_sites=len(spec.sites),
        )
        body = InterveneBody.model_validate(
            {
                "prompt_ids": ids,
                "tensors": spec.tensors,
                "ops": spec.ops,
                "max_new_tokens": request.max_new_tokens,
                "temperature": request.temperature,
                "top_p": request.top_p,
                "seed": request.seed,
                "stop_at_eos": request.stop_at_eos,
                "reproducible": request.reproducible,
            }
        )
        return self.admitted(worst, body)

    def usage(
        self, request: InterveneRequest, admission: Admission, output: InterveneOutput
    ) -> Usage:
        return Usage(
            input_tokens=sum(r.prompt_tokens for r in output.results),
            output_tokens=sum(r.completion_tokens for r in output.results),
            hooked_sites=admission.worst.hooked_sites,
        )

    def receipt_extras(self, request: InterveneRequest, admission: Admission) -> dict[str, Any]:
        return {
            "intervention_sha256": sha256_json(admission.body["ops"]),
            "batch_invariant": request.reproducible or request.max_new_tokens == 0,
        }
