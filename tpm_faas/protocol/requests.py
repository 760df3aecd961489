"""Request models of the three modes: what a user may send, checked before anything runs.

Every model forbids unknown fields, so a typo fails loudly with its path. Tensors travel as
:class:`TensorPayload` (declared dtype and shape, raw little-endian bytes in base64), never as
pickles; their sizes are checked against the declaration before anything is decoded.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from tpm_faas.errors import TensorError
from tpm_faas.protocol import codec
from tpm_faas.protocol.codec import FLOAT_DTYPES

ModelRef = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z0-9._-]+$")]
RequestId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorPayload(Strict):
    """A tensor: declared ``dtype`` and ``shape``, and its raw little-endian bytes in standard
    base64 ('=' padding at the end only); size and text are checked before anything is
    decoded."""

    dtype: Literal["float32", "float16", "bfloat16", "int64", "int32"]
    shape: list[Annotated[int, Field(ge=1, le=1 << 24)]] = Field(min_length=1, max_length=4)
    data: str

    @property
    def nbytes(self) -> int:
        return codec.nbytes(self.dtype, self.shape)

    @model_validator(mode="after")
    def _check(self) -> TensorPayload:
        codec.check(self.dtype, self.shape, self.data)
        return self

    def raw(self) -> bytes:
        """The decoded bytes (length already checked against the declaration)."""
        return codec.raw(self.model_dump())

    @classmethod
    def from_bytes(cls, buf: bytes, dtype: str, shape: list[int]) -> TensorPayload:
        return cls.model_validate(codec.encode(buf, dtype, shape))


def _prompt_shorthand(data: object) -> object:
    """Accept ``"prompt": "..."`` for ``"prompts": ["..."]`` and ``"messages": [...]`` (one
    conversation) for ``"chats": [[...]]``."""
    if isinstance(data, dict):
        for short, full in (("prompt", "prompts"), ("messages", "chats")):
            if short in data:
                if full in data:
                    raise ValueError(f"give either '{short}' or '{full}', not both")
                data = dict(data)
                data[full] = [data.pop(short)]
    return data


class _ModeRequest(Strict):
    #: ``NAME@VERSION``, or ``NAME@latest``: the newest version served that the caller may
    #: use, resolved at admission (the reply and receipt name the concrete one).
    model: ModelRef
    request_id: RequestId | None = None
    #: Run batch-invariantly (each prompt decoded alone, never batched with other work), so
    #: a replay on the same version gives the same bits; the site may price it higher.
    reproducible: bool = False


class ChatMessage(Strict):
    """One turn of a conversation, rendered with the model's own chat template."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=1 << 20)


Chat = Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
Prompt = Annotated[str, Field(min_length=1)]


class _Prompted(_ModeRequest):
    """Text in: ``prompts`` (tokenized as they are, with the model's BOS), or ``chats``
    (conversations rendered with the checkpoint's chat template; with
    ``add_generation_prompt`` the assistant's turn is opened). ``prompt`` and ``messages``
    are shorthands for one of each."""

    prompts: list[Prompt] | None = Field(default=None, min_length=1, max_length=64)
    chats: list[Chat] | None = Field(default=None, min_length=1, max_length=64)
    add_generation_prompt: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: object) -> object:
        return _prompt_shorthand(data)

    @model_validator(mode="after")
    def _one_kind(self) -> _Prompted:
        if (self.prompts is None) == (self.chats is None):
            raise ValueError(
                "give exactly one of 'prompts' (or 'prompt') and 'chats' (or 'messages')"
            )
        return self

    @property
    def n_inputs(self) -> int:
        """How many prompts or conversations the request holds."""
        return len(self.prompts if self.prompts is not None else self.chats or [])


StopString = Annotated[str, Field(min_length=1, max_length=256)]


class QueryRequest(_Prompted):
    """Prompt(s) or chat(s) in, generated text out.

    Generation stops at ``max_new_tokens``, at the model's end-of-sequence ids (its
    ``generation_config.json``; unless ``stop_at_eos`` is false), at any of
    ``stop_token_ids``, or when the text contains one of ``stop`` (the text is cut before it).
    """

    max_new_tokens: int = Field(default=64, ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, lt=2**63)
    logprobs: bool = False
    stop_at_eos: bool = True
    stop: list[StopString] = Field(default_factory=list, max_length=16)
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=1 << 24)]] = Field(
        default_factory=list, max_length=64
    )


class EmbedRequest(_ModeRequest):
    """Custom inputs through the frozen core: ``inputs_embeds``, an input adapter's raw input,
    or text (``prompts`` or ``chats``, through the model's own tokenizer and embeddings).

    ``head`` names a registered output head; without it the pooled final hidden state is
    returned (one row per input).
    """

    prompts: list[Prompt] | None = Field(default=None, min_length=1, max_length=64)
    chats: list[Chat] | None = Field(default=None, min_length=1, max_length=64)
    add_generation_prompt: bool = False
    inputs_embeds: TensorPayload | None = None
    adapter: str | None = Field(default=None, max_length=64)
    adapter_input: TensorPayload | None = None
    head: str | None = Field(default=None, max_length=64)
    pooling: Literal["mean", "last"] = "mean"

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: object) -> object:
        return _prompt_shorthand(data)

    @model_validator(mode="after")
    def _one_input(self) -> EmbedRequest:
        given = [
            k
            for k in ("prompts", "chats", "inputs_embeds", "adapter_input")
            if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'prompts', 'chats', 'inputs_embeds' or 'adapter_input'"
            )
        if (self.adapter is None) != (self.adapter_input is None):
            raise ValueError("'adapter' and 'adapter_input' go together")
        for name, t in (
            ("inputs_embeds", self.inputs_embeds),
            ("adapter_input", self.adapter_input),
        ):
            if t is not None and t.dtype not in FLOAT_DTYPES:
                raise TensorError(f"{name} must be a floating-point tensor, not {t.dtype}")
        return self


class Range(Strict):
    """``start, start + step, ...`` below ``stop`` (Python's ``range``); negative positions
    count from the end of the prompt."""

    start: int = Field(ge=-65536, le=65536)
    stop: int = Field(ge=-65536, le=65536)
    step: int = Field(default=1, ge=1, le=65536)


TensorName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class TensorRef(Strict):
    """A tensor of the request's ``tensors`` table, by name (send a vector once, use it often)."""

    ref: TensorName


class ResultTensor(Strict):
    """A tensor of an earlier result of yours that came back by reference (its
    ``tensors_ref``), read by the gateway from the site's results directory: the result's
    request id, the tensor's ``key`` in the file, and the file's ``sha256`` (which pins the
    exact values). Use it to patch or steer with activations without downloading and
    re-sending them; it counts toward the request's input bytes like an inline tensor."""

    result: RequestId
    key: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def _table_kind(v: object) -> str:
    """Which kind a ``tensors`` entry is, so a bad one is reported against that kind only."""
    if isinstance(v, dict):
        return "result" if "result" in v else "inline"
    return "result" if isinstance(v, ResultTensor) else "inline"


#: An entry of a request's ``tensors`` table: the values, or an earlier result's tensor.
TableTensor = Annotated[
    Annotated[TensorPayload, Tag("inline")] | Annotated[ResultTensor, Tag("result")],
    Discriminator(_table_kind),
]

Index = Annotated[int, Field(ge=-65536, le=65536)]
LayerSelector = list[Annotated[int, Field(ge=0, le=65536)]] | Range | Literal["*"]
PositionSelector = list[Index] | Range | None
HeadSelector = list[Annotated[int, Field(ge=0, le=65536)]] | Literal["*"] | None
TensorValue = TensorPayload | TensorRef
Scale = Annotated[float, Field(ge=-1e4, le=1e4, allow_inf_nan=False)]


class _SiteOp(Strict):
    """Where an op acts: a site, its layers, the prompts and token positions, and whether it
    also acts on the generated tokens that are fed back through the model (with ``k`` new
    tokens, the first ``k - 1``: the last one is sampled and never run, as in
    ``transformers`` ``generate``).

    ``site`` is a block site (``hook_resid_post``, ``attn.hook_z``, ...) together with
    ``layers``, or a full name (``blocks.3.hook_resid_post``, ``embed``, ``ln_final``,
    ``unembed``) without them. ``positions`` selects prompt tokens (default: all of them);
    ``prompts`` selects prompts of the request by index (default: all of them).
    """

    site: str = Field(max_length=64)
    layers: LayerSelector | None = None
    positions: PositionSelector = None
    prompts: list[Annotated[int, Field(ge=0, le=1023)]] | None = Field(
        default=None, max_length=1024
    )
    heads: HeadSelector = None
    generation: bool = False


class SaveOp(_SiteOp):
    """Return the site's values (after this request's writes at the site): rows in the order
    of ``positions`` (then generated tokens), heads in the order of ``heads``; the reply names
    each row's position and each head row's head."""

    op: Literal["save"]


class SetOp(_SiteOp):
    """Replace the site's values by ``value`` (one token's shape, or one row per position)."""

    op: Literal["set"]
    value: TensorValue


class AddOp(_SiteOp):
    """Add ``scale * vector`` (one token's shape; a steering vector)."""

    op: Literal["add"]
    vector: TensorValue
    scale: Scale = 1.0


class AblateOp(_SiteOp):
    """Zero the site, or set it to its mean over the prompt's tokens."""

    op: Literal["ablate"]
    method: Literal["zero", "mean"] = "zero"


class PatchOp(_SiteOp):
    """Copy the site's values from another (earlier) prompt of the same request, at
    ``source_positions`` of the source (by default ``positions`` again, resolved against the
    source prompt) into ``positions`` of each target prompt."""

    op: Literal["patch"]
    source: int = Field(ge=0, le=1023)
    source_positions: PositionSelector = None


class ScaleHeadsOp(_SiteOp):
    """Multiply chosen heads of ``attn.hook_z`` by ``scale``."""

    op: Literal["scale_heads"]
    site: str = Field(default="attn.hook_z", max_length=64)
    scale: Scale = 0.0


class LogitLensOp(_SiteOp):
    """Top-k next-token predictions read off the residual stream (final norm, then unembed)."""

    op: Literal["logit_lens"]
    site: str = Field(default="hook_resid_post", max_length=64)
    layers: LayerSelector | None = "*"
    positions: PositionSelector = Field(default_factory=lambda: [-1])
    top_k: int = Field(default=5, ge=1, le=50)


class DropExpertsOp(_SiteOp):
    """Knock ``experts`` out of a mixture of experts' routing at the chosen layers, prompts
    and positions (and generated tokens with ``generation``): their router logits become
    ``-inf``, so no token there chooses them and the routing is renormalised over the other
    experts as the architecture routes (softmax then top-k; DeepSeek's sigmoid scores, groups
    and top-k). Without ``layers``, every MoE layer. At least ``top_k`` experts must remain
    at a layer, over all of a request's knock-outs."""

    op: Literal["drop_experts"]
    site: str = Field(default="mlp.hook_router_logits", max_length=64)
    experts: list[Annotated[int, Field(ge=0, le=65535)]] = Field(min_length=1, max_length=4096)


InterventionOp = Annotated[
    SaveOp | SetOp | AddOp | AblateOp | PatchOp | ScaleHeadsOp | LogitLensOp | DropExpertsOp,
    Field(discriminator="op"),
]
#: Ops that write hidden states (they need the policy's write permission).
WRITE_OPS = frozenset({"set", "add", "ablate", "patch", "scale_heads", "drop_experts"})


class InterveneRequest(_Prompted):
    """Prompts (or chats) and a declarative list of reads and writes at named hook sites.

    Ops run in the order given at each site; a read sees the site after every write to it.
    Positions index the tokens of each prompt as the model's tokenizer (and chat template)
    makes them.
    """

    tensors: dict[TensorName, TableTensor] = Field(default_factory=dict, max_length=64)
    ops: list[InterventionOp] = Field(min_length=1, max_length=64)
    max_new_tokens: int = Field(default=0, ge=0, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, lt=2**63)
    stop_at_eos: bool = True
