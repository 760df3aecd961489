"""Intermediary access: declarative reads and writes of hidden states at named hook sites.

The spec is checked against the model (layers, positions, vector widths) and the caller's
limits (ops allowed, write permission, sites touched, bytes returned) before admission, and
normalised (``"*"`` expanded, negative positions resolved) so the shard group runs exactly
what was priced.
"""

from __future__ import annotations

from typing import Any

from tpm_faas.errors import PolicyDenied, RequestError, TensorError
from tpm_faas.gateway.policy import Limits, Usage, check_limit
from tpm_faas.modes.base import Admission, Mode, check_context, check_output_bytes, count_tokens
from tpm_faas.modes.query import BYTES_PER_TOKEN
from tpm_faas.registry import ModelInfo
from tpm_faas.schemas import AddOp, InterveneRequest, LogitLensOp, SaveOp

WRITE_OPS = frozenset({"add"})
#: Worst-case bytes of one logit-lens entry (token text, id and probability in JSON).
BYTES_PER_LENS_ENTRY = 48


def _layers(sel: list[int] | str, n: int, where: str) -> list[int]:
    if sel == "*":
        return list(range(n))
    assert isinstance(sel, list)
    for i in sel:
        if i >= n:
            raise RequestError(f"{where}: layer {i} is out of range (the model has {n} layers)")
    return sorted(set(sel))


def _positions(sel: list[int] | None, length: int, where: str) -> list[int]:
    if sel is None:
        return list(range(length))
    out = []
    for p in sel:
        q = p + length if p < 0 else p
        if not 0 <= q < length:
            raise RequestError(
                f"{where}: position {p} is out of range for a prompt of {length} tokens"
            )
        out.append(q)
    return sorted(set(out))


class InterveneMode(Mode):
    name = "intervene"
    request_model = InterveneRequest
    shard_op = "intervene"

    def admit(self, request: InterveneRequest, model: ModelInfo, limits: Limits) -> Admission:
        n_tokens = count_tokens(model, request.prompt)
        check_limit("the prompt (tokens)", n_tokens, limits.max_prompt_tokens)
        check_limit("max_new_tokens", request.max_new_tokens, limits.max_new_tokens)
        check_context(model, n_tokens, request.max_new_tokens)
        d, n_layers = model.hidden_size, model.num_layers
        ops: list[dict[str, Any]] = []
        sites: set[tuple[str, int]] = set()
        out_bytes = BYTES_PER_TOKEN * request.max_new_tokens
        for i, op in enumerate(request.ops):
            where = f"ops[{i}] ({op.op})"
            if op.op not in limits.allowed_ops:
                raise PolicyDenied(
                    f"{where}: the {op.op!r} operation is not allowed for your group"
                )
            if op.op in WRITE_OPS and not limits.write:
                raise PolicyDenied(f"{where}: your group may read hidden states but not write them")
            if isinstance(op, SaveOp):
                layers = _layers(op.layers, n_layers, where)
                pos = _positions(op.positions, n_tokens, where)
                sites.update((op.site, layer) for layer in layers)
                out_bytes += len(layers) * len(pos) * d * 4
                ops.append({"op": "save", "site": op.site, "layers": layers, "positions": pos})
            elif isinstance(op, AddOp):
                if op.layer >= n_layers:
                    raise RequestError(
                        f"{where}: layer {op.layer} is out of range ({n_layers} layers)"
                    )
                if op.vector.shape != [d]:
                    raise TensorError(f"{where}: vector has shape {op.vector.shape}; needs [{d}]")
                pos_add = (
                    None if op.positions is None else _positions(op.positions, n_tokens, where)
                )
                sites.add((op.site, op.layer))
                ops.append(
                    {
                        "op": "add",
                        "site": op.site,
                        "layer": op.layer,
                        "vector": op.vector.model_dump(),
                        "scale": op.scale,
                        "positions": pos_add,
                    }
                )
            elif isinstance(op, LogitLensOp):
                layers = _layers(op.layers, n_layers, where)
                pos = _positions(op.positions, n_tokens, where)
                sites.update(("hook_resid_post", layer) for layer in layers)
                out_bytes += len(layers) * len(pos) * op.top_k * BYTES_PER_LENS_ENTRY
                ops.append(
                    {"op": "logit_lens", "layers": layers, "positions": pos, "top_k": op.top_k}
                )
        check_limit("hook sites touched", len(sites), limits.max_hook_sites)
        check_output_bytes(out_bytes, limits)
        worst = Usage(
            input_tokens=n_tokens,
            output_tokens=request.max_new_tokens,
            bytes_returned=out_bytes,
            hooked_sites=len(sites),
        )
        body = {
            "prompt": request.prompt,
            "ops": ops,
            "max_new_tokens": request.max_new_tokens,
            "seed": request.seed,
        }
        return Admission(worst, self.shard_op, body)

    def usage(
        self, request: InterveneRequest, admission: Admission, result: dict[str, Any]
    ) -> Usage:
        return Usage(
            input_tokens=int(result["prompt_tokens"]),
            output_tokens=int(result["completion_tokens"]),
            hooked_sites=admission.worst.hooked_sites,
        )
