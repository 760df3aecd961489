"""Request models of the three modes: what a user may send, checked before anything runs.

Every model forbids unknown fields, so a typo fails loudly with its path. Tensors travel as
:class:`TensorPayload` (declared dtype and shape, raw little-endian bytes in base64), never as
pickles; their sizes are checked against the declaration before anything is decoded.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tpm_faas.errors import TensorError

#: Bytes per element of every dtype a tensor may declare.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
}

#: No tensor in a request may be larger than this, whatever the policy says.
MAX_TENSOR_BYTES = 64 * 1024 * 1024

ModelRef = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z0-9._-]+$")]
RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorPayload(Strict):
    """A tensor: declared ``dtype`` and ``shape``, and its raw bytes in base64."""

    dtype: Literal["float32", "float16", "bfloat16", "int64", "int32"]
    shape: list[Annotated[int, Field(ge=1, le=1 << 24)]] = Field(min_length=1, max_length=4)
    data: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @model_validator(mode="after")
    def _check_size(self) -> TensorPayload:
        # Checked on the declaration and the base64 length, before any decoding.
        if self.nbytes > MAX_TENSOR_BYTES:
            raise TensorError(
                f"tensor of shape {self.shape} and dtype {self.dtype} is {self.nbytes} bytes; "
                f"the limit is {MAX_TENSOR_BYTES}"
            )
        expected_b64 = 4 * math.ceil(self.nbytes / 3)
        if len(self.data) != expected_b64:
            raise TensorError(
                f"tensor data is {len(self.data)} base64 characters; shape {self.shape} and "
                f"dtype {self.dtype} need {expected_b64} ({self.nbytes} bytes)"
            )
        return self

    def raw(self) -> bytes:
        """The decoded bytes (length already checked against the declaration)."""
        try:
            buf = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise TensorError(f"tensor data is not valid base64: {e}") from e
        if len(buf) != self.nbytes:
            raise TensorError(f"tensor data decodes to {len(buf)} bytes, expected {self.nbytes}")
        return buf

    @classmethod
    def from_bytes(cls, buf: bytes, dtype: str, shape: list[int]) -> TensorPayload:
        return cls(dtype=dtype, shape=shape, data=base64.b64encode(buf).decode("ascii"))  # type: ignore[arg-type]


class _ModeRequest(Strict):
    model: ModelRef
    request_id: RequestId | None = None


class QueryRequest(_ModeRequest):
    """Prompt(s) in, generated text out."""

    prompts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=64)
    max_new_tokens: int = Field(default=64, ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, lt=2**63)
    logprobs: bool = False
    stop_at_eos: bool = True

    @model_validator(mode="before")
    @classmethod
    def _one_prompt(cls, data: object) -> object:
        # Accept "prompt": "..." as a shorthand for "prompts": ["..."].
        if isinstance(data, dict) and "prompt" in data:
            if "prompts" in data:
                raise ValueError("give either 'prompt' or 'prompts', not both")
            data = dict(data)
            data["prompts"] = [data.pop("prompt")]
        return data


class EmbedRequest(_ModeRequest):
    """Custom inputs through the frozen core: ``inputs_embeds`` or an input adapter's raw input.

    ``head`` names a registered output head; without it the pooled final hidden state is
    returned.
    """

    inputs_embeds: TensorPayload | None = None
    adapter: str | None = Field(default=None, max_length=64)
    adapter_input: TensorPayload | None = None
    head: str | None = Field(default=None, max_length=64)
    pooling: Literal["mean", "last"] = "mean"

    @model_validator(mode="after")
    def _one_input(self) -> EmbedRequest:
        if (self.inputs_embeds is None) == (self.adapter_input is None):
            raise ValueError("give exactly one of 'inputs_embeds' or 'adapter_input'")
        if (self.adapter is None) != (self.adapter_input is None):
            raise ValueError("'adapter' and 'adapter_input' go together")
        for name, t in (
            ("inputs_embeds", self.inputs_embeds),
            ("adapter_input", self.adapter_input),
        ):
            if t is not None and t.dtype not in ("float32", "bfloat16", "float16"):
                raise TensorError(f"{name} must be a floating-point tensor, not {t.dtype}")
        return self


LayerSelector = list[Annotated[int, Field(ge=0, le=4096)]] | Literal["*"]
Positions = list[Annotated[int, Field(ge=-65536, le=65536)]] | None


class SaveOp(Strict):
    """Return the residual stream after the given layers, at the given token positions."""

    op: Literal["save"]
    site: Literal["hook_resid_post"] = "hook_resid_post"
    layers: LayerSelector
    positions: Positions = None


class AddOp(Strict):
    """Add ``scale * vector`` to the residual stream after one layer (a steering vector)."""

    op: Literal["add"]
    site: Literal["hook_resid_post"] = "hook_resid_post"
    layer: int = Field(ge=0, le=4096)
    vector: TensorPayload
    scale: float = Field(default=1.0, ge=-1e4, le=1e4, allow_inf_nan=False)
    positions: Positions = None


class LogitLensOp(Strict):
    """Top-k next-token predictions read off the residual stream after each layer."""

    op: Literal["logit_lens"]
    layers: LayerSelector = "*"
    positions: Positions = Field(default_factory=lambda: [-1])
    top_k: int = Field(default=5, ge=1, le=50)


InterventionOp = Annotated[SaveOp | AddOp | LogitLensOp, Field(discriminator="op")]


class InterveneRequest(_ModeRequest):
    """A prompt and a declarative list of reads and writes at named hook sites."""

    prompt: str = Field(min_length=1)
    ops: list[InterventionOp] = Field(min_length=1, max_length=64)
    max_new_tokens: int = Field(default=0, ge=0, le=32768)
    seed: int = Field(default=0, ge=0, lt=2**63)

    @field_validator("ops")
    @classmethod
    def _vectors_are_float(cls, ops: list[InterventionOp]) -> list[InterventionOp]:
        for i, op in enumerate(ops):
            if isinstance(op, AddOp):
                if op.vector.dtype not in ("float32", "bfloat16", "float16"):
                    raise TensorError(f"ops[{i}].vector must be floating point")
                if len(op.vector.shape) != 1:
                    raise TensorError(f"ops[{i}].vector must be 1-D, got shape {op.vector.shape}")
        return ops


MODE_REQUESTS: dict[str, type[_ModeRequest]] = {
    "query": QueryRequest,
    "embed": EmbedRequest,
    "intervene": InterveneRequest,
}
