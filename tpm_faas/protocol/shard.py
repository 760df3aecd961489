"""Typed messages between the gateway and a shard group's rank 0 (JSON over ZeroMQ).

A message is :class:`ShardMessage` (``op``, ``request_id``, ``body``); the body of a mode's
op is the mode's shard body model (``Mode.shard_body``): :class:`QueryBody`,
:class:`EmbedBody`, :class:`InterveneBody`. The gateway builds them after admission (so the
shard group runs exactly what was priced); rank 0 parses them again with the same models
instead of re-checking fields by hand. The reply is :class:`ShardReply`: ``ok`` and a result,
or an error record.

Control ops (:data:`CONTROL_OPS`) carry no body.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tpm_faas.errors import RequestError, TPMError
from tpm_faas.protocol.requests import TensorPayload

B = TypeVar("B", bound=BaseModel)

#: Ops every group answers besides the modes' ops.
CONTROL_OPS = ("ping", "info", "shutdown")

Index = Annotated[int, Field(ge=0)]
#: A prompt as the gateway tokenized it (ids below the model's vocabulary, checked there).
PromptIds = Annotated[list[Index], Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Sampling(_Body):
    prompt_ids: list[PromptIds] = Field(min_length=1)
    temperature: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, lt=2**63)
    stop_at_eos: bool = True
    #: Decode each prompt alone (a batch of one: batch-invariant, replayable).
    reproducible: bool = False


class QueryBody(_Sampling):
    """Generate for each prompt; stop at ``stop_token_ids`` or when the text holds one of
    ``stop`` (besides EOS and ``max_new_tokens``)."""

    max_new_tokens: int = Field(default=64, ge=1)
    logprobs: bool = False
    stop: list[str] = []
    stop_token_ids: list[Index] = []


class EmbedBody(_Body):
    """Inputs through the frozen core (token ids, embeddings, or an adapter's input);
    ``head`` or pooled hidden states out."""

    input_ids: list[PromptIds] | None = None
    inputs_embeds: TensorPayload | None = None
    adapter: str | None = None
    adapter_input: TensorPayload | None = None
    head: str | None = None
    pooling: Literal["mean", "last"] = "mean"

    @model_validator(mode="after")
    def _one_input(self) -> EmbedBody:
        inputs = [self.input_ids, self.inputs_embeds, self.adapter_input]
        if sum(x is not None for x in inputs) != 1 or (self.adapter is None) != (
            self.adapter_input is None
        ):
            raise ValueError("give input_ids, inputs_embeds, or adapter with adapter_input")
        return self


class NormalOp(_Body):
    """One intervention op as the gateway normalised it: explicit sites, prompts, positions
    (non-negative, per prompt) and heads; tensors by name in the body's ``tensors``."""

    op: Literal[
        "save", "set", "add", "ablate", "patch", "scale_heads", "logit_lens", "drop_experts"
    ]
    sites: list[str] = Field(min_length=1)
    prompts: list[Index]
    positions: list[list[Index]]
    heads: list[Index] | None = None
    generation: bool = False
    top_k: int | None = Field(default=None, ge=1)
    value: str | None = None
    scale: float | None = Field(default=None, allow_inf_nan=False)
    method: Literal["zero", "mean"] | None = None
    source: Index | None = None
    source_positions: list[Index] | None = None
    experts: list[Index] | None = None


class InterveneBody(_Sampling):
    """Prompts under a normalised intervention spec."""

    max_new_tokens: int = Field(default=0, ge=0)
    tensors: dict[str, TensorPayload] = {}
    ops: list[NormalOp] = Field(min_length=1)


def parse_body(model: type[B], body: Any) -> B:
    """``body`` read as ``model``; what does not fit is a :class:`RequestError` naming it."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        for err in e.errors():
            inner = (err.get("ctx") or {}).get("error")
            if isinstance(inner, TPMError):
                raise type(inner)(inner.message) from None
        where = ".".join(str(p) for p in e.errors()[0]["loc"]) or "body"
        raise RequestError(
            f"invalid {model.__name__} message: {where}: {e.errors()[0]['msg']}"
        ) from None


class ShardMessage(_Body):
    """What rank 0 receives."""

    op: str = Field(min_length=1, max_length=64)
    request_id: str = ""
    body: dict[str, Any] = {}


class ShardReply(BaseModel):
    """What rank 0 answers."""

    model_config = ConfigDict(extra="forbid")

    ok: bool
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
