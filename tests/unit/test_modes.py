"""Admission of each mode: checks against the model and the caller's limits, worst-case usage."""

from __future__ import annotations

import base64

import pytest

from tpm_faas.errors import LimitExceeded, PolicyDenied, RequestError, TensorError
from tpm_faas.gateway.policy import Limits
from tpm_faas.modes import MODES
from tpm_faas.registry import ModelInfo
from tpm_faas.schemas import EmbedRequest, InterveneRequest, QueryRequest

INFO = ModelInfo(
    name="m@1",
    hidden_size=8,
    num_layers=4,
    vocab_size=264,
    max_positions=64,
    tokenizer="bytes",
    checkpoint_sha256="0" * 64,
    dtype="float32",
    adapters={"features-linear": {"kind": "linear", "in_features": 3}},
    heads={"regression": {"kind": "linear", "out_features": 1}},
)
LIMITS = Limits(
    max_new_tokens=16, max_prompt_tokens=32, allowed_ops=["save", "add", "logit_lens"], write=True
)


def vec(n: int) -> dict[str, object]:
    return {"dtype": "float32", "shape": [n], "data": base64.b64encode(b"\0" * 4 * n).decode()}


def test_query_worst_case() -> None:
    a = MODES["query"].admit(
        QueryRequest(model="m@1", prompts=["abc", "de"], max_new_tokens=10), INFO, LIMITS
    )
    assert a.worst.input_tokens == (3 + 1) + (2 + 1) and a.worst.output_tokens == 20
    assert a.shard_op == "generate" and "request_id" not in a.body


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"prompts": ["x"], "max_new_tokens": 17}, "max_new_tokens"),
        ({"prompts": ["x" * 40], "max_new_tokens": 4}, r"prompts\[0\]"),
        ({"prompts": ["x"] * 9, "max_new_tokens": 4}, "number of prompts"),
    ],
)
def test_query_limits(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(LimitExceeded, match=match):
        MODES["query"].admit(QueryRequest(model="m@1", **kwargs), INFO, LIMITS)  # type: ignore[arg-type]


def test_query_context_window() -> None:
    limits = Limits(max_new_tokens=1000, max_prompt_tokens=1000)
    with pytest.raises(LimitExceeded, match="context"):
        MODES["query"].admit(
            QueryRequest(model="m@1", prompts=["x" * 30], max_new_tokens=40), INFO, limits
        )


def test_embed_shapes_checked_against_model() -> None:
    ok = EmbedRequest.model_validate(
        {
            "model": "m@1",
            "inputs_embeds": {
                "dtype": "float32",
                "shape": [2, 5, 8],
                "data": base64.b64encode(b"\0" * 320).decode(),
            },
        }
    )
    a = MODES["embed"].admit(ok, INFO, LIMITS)
    assert a.worst.input_tokens == 10 and a.worst.bytes_returned == 2 * 8 * 4
    bad = EmbedRequest.model_validate(
        {
            "model": "m@1",
            "inputs_embeds": {
                "dtype": "float32",
                "shape": [2, 5, 4],
                "data": base64.b64encode(b"\0" * 160).decode(),
            },
        }
    )
    with pytest.raises(TensorError, match="needs 8"):
        MODES["embed"].admit(bad, INFO, LIMITS)


def test_embed_unknown_adapter_and_head() -> None:
    t = {"dtype": "float32", "shape": [1, 3], "data": base64.b64encode(b"\0" * 12).decode()}
    with pytest.raises(RequestError, match="unknown adapter"):
        MODES["embed"].admit(
            EmbedRequest.model_validate({"model": "m@1", "adapter": "nope", "adapter_input": t}),
            INFO,
            LIMITS,
        )
    with pytest.raises(RequestError, match="unknown head"):
        MODES["embed"].admit(
            EmbedRequest.model_validate(
                {"model": "m@1", "adapter": "features-linear", "adapter_input": t, "head": "nope"}
            ),
            INFO,
            LIMITS,
        )


def test_intervene_normalises_and_prices() -> None:
    req = InterveneRequest.model_validate(
        {
            "model": "m@1",
            "prompt": "abcd",
            "ops": [
                {"op": "save", "layers": [1, 3], "positions": [-1, 0]},
                {"op": "logit_lens", "top_k": 2},
                {"op": "add", "layer": 0, "vector": vec(8)},
            ],
        }
    )
    a = MODES["intervene"].admit(req, INFO, LIMITS)
    assert a.body["ops"][0]["positions"] == [0, 4]
    assert a.body["ops"][1]["layers"] == [0, 1, 2, 3]
    assert a.worst.hooked_sites == 4


@pytest.mark.parametrize(
    "op,exc,match",
    [
        ({"op": "save", "layers": [4]}, RequestError, "out of range"),
        ({"op": "save", "layers": [0], "positions": [9]}, RequestError, "position 9"),
        ({"op": "add", "layer": 0, "vector": vec(7)}, TensorError, "needs"),
    ],
)
def test_intervene_bad_spec(op: dict[str, object], exc: type[Exception], match: str) -> None:
    req = InterveneRequest.model_validate({"model": "m@1", "prompt": "abc", "ops": [op]})
    with pytest.raises(exc, match=match):
        MODES["intervene"].admit(req, INFO, LIMITS)


def test_intervene_write_needs_permission() -> None:
    req = InterveneRequest.model_validate(
        {"model": "m@1", "prompt": "abc", "ops": [{"op": "add", "layer": 0, "vector": vec(8)}]}
    )
    read_only = Limits(allowed_ops=["save", "add"], write=False)
    with pytest.raises(PolicyDenied, match="not write"):
        MODES["intervene"].admit(req, INFO, read_only)
    with pytest.raises(PolicyDenied, match="not allowed"):
        MODES["intervene"].admit(req, INFO, Limits())
