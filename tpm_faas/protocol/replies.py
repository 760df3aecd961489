"""Typed replies: what a mode function returns and what the client reads.

A reply is ``{"ok": true, request_id, mode, model, output, usage, receipt}`` or
``{"ok": false, "error": {type, code, layer, message, request_id}}``. Each mode's ``output`` has
its own model (:class:`QueryOutput`, :class:`EmbedOutput`, :class:`InterveneOutput`); the mode
registry says which (``Mode.output_model``).

Reply models accept fields they do not know (a newer site may add some) and are read-only.
They also answer ``reply["field"]``, so code written against the plain JSON keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer


class Record(BaseModel):
    """A read-only reply record; ``record["name"]`` is ``record.name``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def __getitem__(self, key: str) -> Any:
        if key in type(self).model_fields or key in (self.model_extra or {}):
            value = getattr(self, key)
            if value is not None or key in self.model_fields_set:
                return value
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        try:
            self[str(key)]
        except KeyError:
            return False
        return True

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        return [k for k in (*type(self).model_fields, *(self.model_extra or {})) if k in self]

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.keys())


class TensorOut(Record):
    """A tensor of a result: inline (``data``, base64) or in the result's file (``key``)."""

    dtype: str
    shape: list[int]
    data: str | None = None
    key: str | None = None


class Completion(Record):
    """One prompt's generation."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    seconds: float | None = None
    #: ``stop`` (EOS, a stop token or a stop string) or ``length`` (``max_new_tokens`` or the
    #: serving context).
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: list[dict[str, Any]] | None = None


class QueryOutput(Record):
    completions: list[Completion]


class EmbedOutput(Record):
    output: TensorOut
    input_tokens: int
    pooling: str
    head: str | None = None


class Saved(Record):
    """A saved site of one prompt: its rows (``tensor``) and which token position each row
    is (``positions``); for ``attn.hook_z`` also which head each head row is (``heads``)."""

    tensor: TensorOut
    positions: list[int] = []
    heads: list[int] | None = None


class InterveneRun(Completion):
    """One prompt under the intervention: its generation, saved sites and logit-lens rows."""

    saved: dict[str, Saved] = {}
    logit_lens: list[dict[str, Any]] = []


class TensorsRef(Record):
    """The file that holds a large result's tensors (see :mod:`tpm_faas.gateway.results`)."""

    name: str
    uri: str
    sha256: str
    bytes: int
    format: Literal["safetensors"] = "safetensors"


class InterveneOutput(Record):
    results: list[InterveneRun]
    tensors_ref: TensorsRef | None = None


class Usage(Record):
    """What a request consumed and was charged (SU as floats for display)."""

    input_tokens: int = 0
    output_tokens: int = 0
    bytes_returned: int = 0
    hooked_sites: int = 0
    su: float = 0.0
    su_held: float = 0.0
    project: str = ""
    seconds: float = 0.0
    #: Serving figures of the shard group (queue wait, time to first token, decode rate).
    timing: dict[str, Any] | None = None


class Receipt(Record):
    """What reproduces a result: the exact weights, the request, the seed, how it ran, the
    software and the site (``tpm-faas replay`` re-runs it and compares)."""

    request_id: str
    #: The concrete ``NAME@VERSION`` that ran (``NAME@latest`` resolved at admission).
    model: str
    #: sha256 over the version's files (config, weights, tokenizer, adapters and heads).
    checkpoint_sha256: str
    #: sha256 of the version store's manifest the weights were rebuilt from (``None``: served
    #: from a plain directory of a model root).
    manifest_sha256: str | None = None
    request_sha256: str
    seed: int | None = None
    #: ``intervene`` only: sha256 of the normalised spec the shard group ran.
    intervention_sha256: str | None = None
    #: ``embed`` only: the adapter and head used; they are part of the version, which
    #: ``extras_sha256`` (sha256 of its ``extras.safetensors``) pins.
    adapter: str | None = None
    head: str | None = None
    extras_sha256: str | None = None
    dtype: str
    tp_size: int
    #: Expert-parallel ranks (a mixture of experts' routed sum is all-reduced over them).
    ep_size: int = 1
    #: Whether the result does not depend on what else the group served meanwhile (a
    #: ``reproducible`` request, or a mode that never batches across requests).
    batch_invariant: bool = False
    policy_sha256: str
    versions: dict[str, str]
    #: The site that ran it (``TPM_FAAS_SITE``).
    site: str = ""
    issued_at: float


class ErrorRecord(Record):
    """An error as it crosses a process or network boundary (never a pickled exception).

    ``retry_after_s`` (seconds until the same request may pass) and ``limit`` (the policy
    limit that refused it) come with refusals that have them, e.g. ``rate_limited``; they are
    left out of the JSON when unset, so every other record is as it always was.
    """

    type: str = "TPMError"
    code: str = "internal"
    layer: str = "internal"
    message: str = ""
    request_id: str | None = None
    retry_after_s: float | None = None
    limit: str | None = None

    @model_serializer(mode="wrap")
    def _without_unset_extras(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for key in ("retry_after_s", "limit"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class Reply(Record):
    """A mode function's successful reply; ``output`` is checked by the mode's model."""

    ok: Literal[True] = True
    request_id: str
    mode: str
    model: str
    output: dict[str, Any]
    usage: Usage
    receipt: Receipt


class ErrorReply(Record):
    ok: Literal[False] = False
    error: ErrorRecord
