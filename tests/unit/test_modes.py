"""Admission of each mode: checks against the model and the caller's limits, worst-case usage."""

from __future__ import annotations

import base64

import pytest

from tpm_faas.errors import LimitExceeded, PolicyDenied, RequestError, TensorError
from tpm_faas.modes import MODES
from tpm_faas.policy import Limits
from tpm_faas.protocol.requests import EmbedRequest, InterveneRequest, QueryRequest
from tpm_faas.registry import ModelInfo

INFO = ModelInfo(
    name="m@1",
    hidden_size=8,
    num_layers=4,
    vocab_size=264,
    max_positions=64,
    tokenizer="bytes",
    checkpoint_sha256="0" * 64,
    dtype="float32",
    architecture="llama",
    num_heads=2,
    head_dim=4,
    adapters={"features-linear": {"kind": "linear", "in_features": 3}},
    heads={"regression": {"kind": "linear", "out_features": 1}},
)
LIMITS = Limits(
    max_new_tokens=16,
    max_prompt_tokens=32,
    allowed_ops=["save", "add", "set", "logit_lens"],
    write=True,
)


def vec(n: int) -> dict[str, object]:
    return {"dtype": "float32", "shape": [n], "data": base64.b64encode(b"\0" * 4 * n).decode()}


def test_query_worst_case() -> None:
    a = MODES["query"].admit(
        QueryRequest(model="m@1", prompts=["abc", "de"], max_new_tokens=10), INFO, LIMITS
    )
    assert a.worst.input_tokens == (3 + 1) + (2 + 1) and a.worst.output_tokens == 20
    assert a.shard_op == "query" and "request_id" not in a.body and "model" not in a.body


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
    # 2 x 8 floats, plus the JSON around them and the by-reference envelope (see pricing.py)
    assert a.worst.input_tokens == 10 and 2 * 8 * 4 < a.worst.bytes_returned < 2 * 8 * 4 + 2500
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


def _admit(ops: list[dict[str, object]], limits: Limits = LIMITS, **kw: object) -> object:
    req = InterveneRequest.model_validate({"model": "m@1", "prompt": "abcd", "ops": ops, **kw})
    return MODES["intervene"].admit(req, INFO, limits)


def test_intervene_normalises_and_prices() -> None:
    a = _admit(
        [
            {"op": "save", "site": "hook_resid_post", "layers": [1, 3], "positions": [-1, 0]},
            {"op": "logit_lens", "top_k": 2},
            {"op": "add", "site": "blocks.0.hook_resid_post", "vector": vec(8)},
            {
                "op": "save",
                "site": "attn.hook_z",
                "layers": {"start": 0, "stop": 4, "step": 2},
                "heads": [1],
                "positions": [0],
            },
        ]
    )
    ops = a.body["ops"]
    assert ops[0]["positions"] == [[4, 0]] and ops[0]["prompts"] == [0]  # a save: order asked
    assert ops[0]["sites"] == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    assert ops[1]["sites"] == [f"blocks.{i}.hook_resid_post" for i in range(4)]
    assert ops[2]["value"] == "#ops.2.value" and set(a.body["tensors"]) == {"#ops.2.value"}
    assert ops[3]["sites"] == ["blocks.0.attn.hook_z", "blocks.2.attn.hook_z"]
    assert ops[3]["heads"] == [1]
    assert a.worst.hooked_sites == 6
    # 2 sites x 2 positions x 8 floats; 2 x 1 x 1 head x 4; 4 lens rows of 2 entries; JSON
    assert a.worst.bytes_returned > 2 * 2 * 8 * 4 + 2 * 4 * 4 + 4 * (2 * 40 + 80)


def test_intervene_prices_generation_and_prompts() -> None:
    req = InterveneRequest.model_validate(
        {
            "model": "m@1",
            "prompts": ["ab", "cd"],
            "max_new_tokens": 5,
            "ops": [{"op": "save", "site": "ln_final", "positions": [-1], "generation": True}],
        }
    )
    a = MODES["intervene"].admit(req, INFO, LIMITS)
    assert a.worst.output_tokens == 10
    # Per prompt: 1 prompt row + 4 generated rows (the 5th token is never fed) of 8 floats.
    prompt_only = req.model_copy(
        update={"ops": [req.ops[0].model_copy(update={"generation": False})]}
    )
    b = MODES["intervene"].admit(prompt_only, INFO, LIMITS)
    assert a.worst.bytes_returned - b.worst.bytes_returned >= 2 * 4 * 8 * 4


def test_intervene_shared_tensor_by_reference() -> None:
    a = _admit(
        [
            {"op": "add", "site": "hook_resid_pre", "layers": "*", "vector": {"ref": "v"}},
            {"op": "set", "site": "embed", "positions": [0], "value": {"ref": "v"}},
        ],
        tensors={"v": vec(8)},
    )
    assert a.body["ops"][0]["value"] == a.body["ops"][1]["value"] == "v"
    assert list(a.body["tensors"]) == ["v"]


@pytest.mark.parametrize(
    "op,exc,match",
    [
        ({"op": "save", "site": "hook_resid_post", "layers": [4]}, RequestError, "out of range"),
        ({"op": "save", "site": "blocks.9.hook_resid_post"}, RequestError, "4 layers"),
        ({"op": "save", "site": "hook_resid_post"}, RequestError, "needs 'layers'"),
        ({"op": "save", "site": "embed", "layers": [0]}, RequestError, "goes with a block"),
        ({"op": "save", "site": "blocks.0.hook_q"}, RequestError, "unknown hook site"),
        ({"op": "save", "site": "embed", "positions": [9]}, RequestError, "position 9"),
        ({"op": "save", "site": "embed", "prompts": [1]}, RequestError, "prompt 1"),
        ({"op": "save", "site": "embed", "heads": [0]}, RequestError, "heads of attn"),
        (
            {"op": "save", "site": "attn.hook_z", "layers": [0], "heads": [2]},
            RequestError,
            "head 2",
        ),
        (
            {"op": "save", "site": "embed", "positions": {"start": 3, "stop": 1}},
            RequestError,
            "picks nothing",
        ),
        ({"op": "add", "site": "embed", "vector": vec(7)}, TensorError, "needs"),
        ({"op": "add", "site": "embed", "vector": {"ref": "nope"}}, RequestError, "no tensor"),
        (
            {"op": "add", "site": "embed", "vector": vec(8), "generation": True},
            RequestError,
            "max_new_tokens",
        ),
        (
            {"op": "scale_heads", "site": "hook_mlp_out", "layers": [0]},
            RequestError,
            "attn.hook_z only",
        ),
        ({"op": "patch", "site": "embed", "source": 0}, RequestError, "must come earlier"),
        ({"op": "patch", "site": "embed", "source": 3}, RequestError, "does not exist"),
        ({"op": "logit_lens", "site": "hook_mlp_out"}, RequestError, "logit lens reads"),
    ],
)
def test_intervene_bad_spec(op: dict[str, object], exc: type[Exception], match: str) -> None:
    limits = Limits(
        allowed_ops=["save", "add", "scale_heads", "patch", "logit_lens"],
        write=True,
        max_prompt_tokens=32,
    )
    with pytest.raises(exc, match=match):
        _admit([op], limits)


def test_intervene_z_value_shape_follows_heads() -> None:
    z = {"dtype": "float32", "shape": [2, 4], "data": base64.b64encode(b"\0" * 32).decode()}
    a = _admit([{"op": "add", "site": "attn.hook_z", "layers": [0], "heads": [0, 1], "vector": z}])
    assert a.body["ops"][0]["heads"] is None  # both heads: all of them
    with pytest.raises(TensorError, match=r"needs \[1, 4\]"):
        _admit([{"op": "add", "site": "attn.hook_z", "layers": [0], "heads": [1], "vector": z}])


def test_intervene_write_needs_permission() -> None:
    op = {"op": "add", "site": "blocks.0.hook_resid_post", "vector": vec(8)}
    read_only = Limits(allowed_ops=["save", "add"], write=False)
    with pytest.raises(PolicyDenied, match="not write"):
        _admit([op], read_only)
    with pytest.raises(PolicyDenied, match="not allowed"):
        _admit([op], Limits())


def test_intervene_allowed_sites() -> None:
    limits = Limits(allowed_sites=["blocks.*.hook_resid_*", "ln_final"])
    _admit([{"op": "save", "site": "hook_resid_mid", "layers": "*"}], limits)
    with pytest.raises(PolicyDenied, match=r"blocks\.0\.attn\.hook_z"):
        _admit([{"op": "save", "site": "attn.hook_z", "layers": [0]}], limits)


def test_intervene_limits_on_sites_bytes_and_tensors() -> None:
    with pytest.raises(LimitExceeded, match="hook sites"):
        _admit([{"op": "save", "site": "hook_resid_post", "layers": "*"}], Limits(max_hook_sites=3))
    with pytest.raises(LimitExceeded, match="result size"):
        _admit([{"op": "save", "site": "unembed"}], Limits(max_bytes_returned=1000))
    with pytest.raises(LimitExceeded, match="tensors sent"):
        _admit(
            [{"op": "add", "site": "embed", "vector": vec(8)}],
            Limits(allowed_ops=["add"], write=True, max_input_bytes=16),
        )
    with pytest.raises(RequestError, match="not used"):
        _admit([{"op": "save", "site": "embed"}], tensors={"v": vec(8)})


def test_rows_of_values_pair_with_positions_and_heads_in_the_order_given() -> None:
    per_pos = {"dtype": "float32", "shape": [2, 8], "data": base64.b64encode(b"\0" * 64).decode()}
    a = _admit([{"op": "set", "site": "embed", "positions": [4, 1], "value": per_pos}])
    assert a.body["ops"][0]["positions"] == [[4, 1]]  # row 0 goes to position 4
    z = {"dtype": "float32", "shape": [2, 4], "data": base64.b64encode(b"\0" * 32).decode()}
    b = _admit([{"op": "add", "site": "attn.hook_z", "layers": [0], "heads": [1, 0], "vector": z}])
    assert b.body["ops"][0]["heads"] == [1, 0]  # a permutation of all heads is kept
    with pytest.raises(RequestError, match="picks a position twice"):
        _admit([{"op": "set", "site": "embed", "positions": [1, -4], "value": per_pos}])
    s = _admit([{"op": "save", "site": "embed", "positions": [3, 1, 3]}])
    assert s.body["ops"][0]["positions"] == [[3, 1]]  # a save: order asked, a repeat dropped


def test_merged_saves_are_priced_as_merged() -> None:
    """Two saves of one z site (one head at every position, every head at one position)
    come back as one tensor of every position x every head: that is what is priced."""
    a = _admit(
        [
            {"op": "save", "site": "attn.hook_z", "layers": [0], "heads": [0]},
            {"op": "save", "site": "attn.hook_z", "layers": [0], "positions": [0]},
        ]
    )
    every = _admit([{"op": "save", "site": "attn.hook_z", "layers": [0]}])
    assert a.worst.bytes_returned == every.worst.bytes_returned  # 5 tokens x 2 heads x 4


def test_inline_tensor_names_cannot_collide_with_the_request_tables() -> None:
    ones = {"dtype": "float32", "shape": [8], "data": base64.b64encode(b"\1" * 32).decode()}
    a = _admit(
        [
            {"op": "add", "site": "embed", "vector": {"ref": "ops.1.value"}},
            {"op": "add", "site": "embed", "vector": vec(8)},
        ],
        tensors={"ops.1.value": ones},
    )
    assert a.body["ops"][0]["value"] == "ops.1.value"
    assert a.body["ops"][1]["value"] == "#ops.1.value"
    assert a.body["tensors"]["ops.1.value"] == ones


@pytest.mark.parametrize(
    "body,match",
    [
        ({"prompts": ["x"], "messages": [{"role": "user", "content": "x"}]}, "exactly one"),
        ({"messages": []}, "at least 1"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": "x", "name": "a"}]}, "Extra inputs"),
        ({"prompt": "x", "stop": [""]}, "at least 1 character"),
        ({"prompt": "x", "stop_token_ids": [-1]}, "greater than or equal to 0"),
        ({}, "exactly one"),
    ],
)
def test_chat_and_stop_fields_are_checked(body: dict[str, object], match: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        QueryRequest.model_validate({"model": "m@1", **body})


def test_chats_need_a_chat_template() -> None:
    """A byte-level model has no chat template: chats are refused at admission (no charge)."""
    chat = [{"role": "user", "content": "Who made light?"}]
    for mode, req in (
        (
            "query",
            QueryRequest.model_validate({"model": "m@1", "messages": chat, "max_new_tokens": 4}),
        ),
        ("embed", EmbedRequest.model_validate({"model": "m@1", "messages": chat})),
        (
            "intervene",
            InterveneRequest.model_validate(
                {"model": "m@1", "messages": chat, "ops": [{"op": "save", "site": "embed"}]}
            ),
        ),
    ):
        with pytest.raises(RequestError, match="no chat template"):
            MODES[mode].admit(req, INFO, LIMITS)


def test_text_embed_is_tokenized_and_priced_per_input() -> None:
    a = MODES["embed"].admit(
        EmbedRequest.model_validate({"model": "m@1", "prompts": ["abc", "de"]}), INFO, LIMITS
    )
    assert a.body["input_ids"] == [[256, 97, 98, 99], [256, 100, 101]]
    assert a.worst.input_tokens == 7 and a.worst.bytes_returned > 2 * 8 * 4
    with pytest.raises(LimitExceeded, match=r"inputs\[0\]"):
        MODES["embed"].admit(
            EmbedRequest.model_validate({"model": "m@1", "prompts": ["x" * 40]}), INFO, LIMITS
        )
