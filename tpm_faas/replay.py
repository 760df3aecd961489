"""Replay a result from its receipt and say whether it came out the same, bit for bit.

A receipt (:class:`~tpm_faas.protocol.replies.Receipt`) names the concrete model version
(and, for a version served from the store, its manifest's sha256), the sha256 of the request
that ran, the seed, dtype and parallel layout, whether the run was batch-invariant, the
software versions and the site. :func:`replay_request` turns a saved request back into the
exact request the receipt hashes (the concrete version in place of ``@latest``, a fresh
request id) and refuses one that is not it; :func:`compare` sets a replayed result beside the
original and reports ``identical``, or where they first differ: the prompt, the token index,
the site, and the largest difference.

Torch-free: the client runs it (:meth:`tpm_faas.client.TPMClient.replay`), and so does
``tpm-faas replay``.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tpm_faas.errors import RequestError

if TYPE_CHECKING:
    from tpm_faas.client import Result


@dataclass(frozen=True)
class Difference:
    """Where a replay first departs from the original, in one place of the result."""

    what: str
    prompt: int | None = None
    token_index: int | None = None
    site: str | None = None
    max_abs_diff: float | None = None
    detail: str = ""

    def describe(self) -> str:
        parts = [self.what]
        if self.prompt is not None:
            parts.append(f"prompt {self.prompt}")
        if self.site is not None:
            parts.append(f"site {self.site}")
        if self.token_index is not None:
            parts.append(f"token {self.token_index}")
        if self.max_abs_diff is not None:
            parts.append(f"max |diff| {self.max_abs_diff:.6g}")
        if self.detail:
            parts.append(self.detail)
        return ", ".join(parts)


@dataclass(frozen=True)
class ReplayReport:
    """The outcome of a replay: ``identical``, or the differences found (first one first)."""

    model: str
    request_id: str
    replay_request_id: str
    differences: list[Difference] = field(default_factory=list)
    #: Receipt fields that differ between the two runs (weights, layout, software, site).
    receipt_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "model": self.model,
            "request_id": self.request_id,
            "replay_request_id": self.replay_request_id,
            "differences": [asdict(d) for d in self.differences],
            "receipt_changes": {k: list(v) for k, v in self.receipt_changes.items()},
        }

    def summary(self) -> str:
        if self.identical:
            return f"identical: {self.request_id} replayed on {self.model} bit for bit"
        return f"differs: {self.differences[0].describe()}"


#: Receipt fields a replay compares (what ran, where, with which software).
RECEIPT_FIELDS = (
    "model",
    "checkpoint_sha256",
    "manifest_sha256",
    "request_sha256",
    "intervention_sha256",
    "extras_sha256",
    "dtype",
    "tp_size",
    "ep_size",
    "batch_invariant",
    "versions",
    "site",
)


def replay_request(mode: str, request: dict[str, Any], receipt: Any) -> dict[str, Any]:
    """The ``mode`` request to send again: ``request`` on the receipt's concrete version with
    a fresh request id, checked to be the request the receipt hashes.

    :raises RequestError: ``request`` is not a valid ``mode`` request, or not the one the
        receipt was issued for
    """
    from pydantic import ValidationError

    from tpm_faas.modes import get_mode
    from tpm_faas.modes.base import sha256_json

    again = {**request, "model": receipt.model, "request_id": f"replay-{uuid.uuid4()}"}
    try:
        parsed = get_mode(mode).request_model.model_validate(again)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "request"
        raise RequestError(
            f"the request is not a valid {mode} request: {where}: {err['msg']}"
        ) from None
    got = sha256_json(parsed.model_dump(exclude={"request_id"}))
    if got != receipt.request_sha256:
        raise RequestError(
            f"this request is not the one receipt {receipt.request_id} was issued for "
            f"(request sha256 {got[:12]}…, the receipt's {receipt.request_sha256[:12]}…)"
        )
    return again


def compare(original: Result, again: Result) -> ReplayReport:
    """Set ``again`` (the replay) beside ``original``: bit-exact or where it first differs."""
    changes = {
        k: (getattr(original.receipt, k), getattr(again.receipt, k))
        for k in RECEIPT_FIELDS
        if getattr(original.receipt, k) != getattr(again.receipt, k)
    }
    diffs: list[Difference] = []
    if original.mode != again.mode:
        diffs.append(Difference("mode", detail=f"{original.mode} vs {again.mode}"))
    elif original.mode == "embed":
        _arrays(diffs, "output", original.tensor(), again.tensor(), prompt=None, site=None)
    else:
        _runs(diffs, original, again)
    return ReplayReport(
        model=again.receipt.model,
        request_id=original.request_id,
        replay_request_id=again.request_id,
        differences=diffs,
        receipt_changes=changes,
    )


def _runs(diffs: list[Difference], original: Result, again: Result) -> None:
    a_runs, b_runs = original.runs, again.runs
    if len(a_runs) != len(b_runs):
        diffs.append(Difference("prompts", detail=f"{len(a_runs)} vs {len(b_runs)} results"))
        return
    for i, (a, b) in enumerate(zip(a_runs, b_runs, strict=True)):
        at = _first_mismatch(a.token_ids, b.token_ids)
        if at is not None:
            diffs.append(
                Difference(
                    "generated tokens",
                    prompt=i,
                    token_index=at,
                    detail=f"{_at(a.token_ids, at)} vs {_at(b.token_ids, at)}",
                )
            )
        if a.logprobs is not None and b.logprobs is not None:
            la = np.array([x["logprob"] for x in a.logprobs], dtype=np.float64)
            lb = np.array([x["logprob"] for x in b.logprobs], dtype=np.float64)
            _arrays(diffs, "logprobs", la, lb, prompt=i, site=None)
        if original.mode != "intervene":
            continue
        sa, sb = original.saved_for(i), again.saved_for(i)
        for site in sorted(set(sa) | set(sb)):
            if site not in sa or site not in sb:
                diffs.append(Difference("saved sites", prompt=i, site=site, detail="missing"))
                continue
            pos = a.saved[site].positions
            _arrays(diffs, "saved", sa[site], sb[site], prompt=i, site=site, positions=pos)
        lens_a = [_lens_probs(r) for r in a.logit_lens]
        lens_b = [_lens_probs(r) for r in b.logit_lens]
        if lens_a != lens_b:
            diffs.append(Difference("logit lens", prompt=i, detail="rows differ"))


def _lens_probs(row: dict[str, Any]) -> Any:
    return {k: v for k, v in row.items() if k != "tokens"} if isinstance(row, dict) else row


def _arrays(
    diffs: list[Difference],
    what: str,
    a: np.ndarray,
    b: np.ndarray,
    *,
    prompt: int | None,
    site: str | None,
    positions: list[int] | None = None,
) -> None:
    """Bitwise equality (NaNs with NaNs of the same bits); else where and by how much."""
    if a.shape != b.shape or a.dtype != b.dtype:
        diffs.append(
            Difference(
                what,
                prompt=prompt,
                site=site,
                detail=f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}",
            )
        )
        return
    if a.tobytes() == b.tobytes():
        return
    unequal = (_bits(a) != _bits(b)).any(axis=-1)
    first = np.argwhere(unequal)
    row = int(first[0][0]) if first.size and a.ndim else None
    token = positions[row] if positions and row is not None and row < len(positions) else row
    with np.errstate(invalid="ignore", over="ignore"):
        gap = np.abs(a.astype(np.float64) - b.astype(np.float64))
    finite = gap[np.isfinite(gap)]
    diffs.append(
        Difference(
            what,
            prompt=prompt,
            site=site,
            token_index=token,
            max_abs_diff=float(finite.max()) if finite.size else float("nan"),
        )
    )


def _bits(a: np.ndarray) -> np.ndarray:
    """Each element's bytes along a last axis (so bits compare, not values)."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(*a.shape, a.dtype.itemsize)


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _at(ids: list[int], i: int) -> str:
    return str(ids[i]) if i < len(ids) else "end"


__all__ = ["Difference", "ReplayReport", "compare", "replay_request"]
