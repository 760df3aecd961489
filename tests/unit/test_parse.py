"""Request parsing: malformed JSON, unknown fields, tensors declared wrong."""

from __future__ import annotations

import base64
import json

import pytest

from tpm_faas.errors import MalformedRequest, RequestError, TensorError
from tpm_faas.gateway.pipeline import parse, request_hash
from tpm_faas.protocol.requests import EmbedRequest, InterveneRequest, QueryRequest


def _tensor(
    shape: list[int], dtype: str = "float32", nbytes: int | None = None
) -> dict[str, object]:
    size = nbytes if nbytes is not None else 4 * __import__("math").prod(shape)
    return {"dtype": dtype, "shape": shape, "data": base64.b64encode(b"\0" * size).decode()}


def test_query_shorthand_and_defaults() -> None:
    r = parse(QueryRequest, json.dumps({"model": "demo-tpm@1", "prompt": "hi"}))
    assert r.prompts == ["hi"] and r.max_new_tokens == 64 and r.temperature == 0.0


@pytest.mark.parametrize("text", ["{", "[1, 2]", "", "null"])
def test_malformed_json(text: str) -> None:
    with pytest.raises(MalformedRequest) as e:
        parse(QueryRequest, text)
    assert e.value.error_code == "malformed_json"


def test_not_a_string() -> None:
    with pytest.raises(MalformedRequest):
        parse(QueryRequest, {"model": "demo-tpm@1"})  # type: ignore[arg-type]


def test_unknown_field_named() -> None:
    with pytest.raises(RequestError) as e:
        parse(QueryRequest, json.dumps({"model": "demo-tpm@1", "prompt": "x", "temprature": 1}))
    assert "temprature" in e.value.message and e.value.error_code == "bad_request"


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 10**6),
        ("temperature", -1),
        ("top_p", 0),
        ("model", "nover"),
    ],
)
def test_out_of_range_values(field: str, value: object) -> None:
    with pytest.raises(RequestError) as e:
        parse(QueryRequest, json.dumps({"model": "demo-tpm@1", "prompt": "x", field: value}))
    assert field in e.value.message


def test_tensor_size_mismatch_is_bad_tensor() -> None:
    req = {"model": "demo-tpm@1", "inputs_embeds": _tensor([1, 4, 8], nbytes=12)}
    with pytest.raises(TensorError) as e:
        parse(EmbedRequest, json.dumps(req))
    assert e.value.error_code == "bad_tensor" and "inputs_embeds" in e.value.message


def test_oversize_tensor_refused_before_decoding() -> None:
    # Declares 4 GiB; the data is tiny: refused on the declaration alone.
    req = {
        "model": "demo-tpm@1",
        "inputs_embeds": {"dtype": "float32", "shape": [1024, 1024, 1024], "data": "AAAA"},
    }
    with pytest.raises(TensorError) as e:
        parse(EmbedRequest, json.dumps(req))
    assert "limit" in e.value.message


def test_wrong_dtype_refused() -> None:
    req = {"model": "demo-tpm@1", "inputs_embeds": _tensor([1, 2, 2], dtype="int64", nbytes=32)}
    with pytest.raises(TensorError):
        parse(EmbedRequest, json.dumps(req))
    req["inputs_embeds"] = {**_tensor([2]), "dtype": "complex64"}
    with pytest.raises(RequestError):
        parse(EmbedRequest, json.dumps(req))


def test_embed_needs_exactly_one_input() -> None:
    with pytest.raises(RequestError):
        parse(EmbedRequest, json.dumps({"model": "demo-tpm@1"}))


def test_intervene_ops_discriminated() -> None:
    req = {
        "model": "demo-tpm@1",
        "prompt": "x",
        "ops": [
            {"op": "save", "site": "hook_resid_post", "layers": "*"},
            {"op": "logit_lens"},
            {"op": "add", "site": "embed", "vector": _tensor([8])},
        ],
    }
    r = parse(InterveneRequest, json.dumps(req))
    assert [o.op for o in r.ops] == ["save", "logit_lens", "add"]
    req["ops"] = [{"op": "exec", "code": "import os"}]
    with pytest.raises(RequestError):
        parse(InterveneRequest, json.dumps(req))


def test_request_hash_ignores_request_id() -> None:
    a = parse(QueryRequest, json.dumps({"model": "demo-tpm@1", "prompt": "x", "request_id": "a"}))
    b = parse(QueryRequest, json.dumps({"model": "demo-tpm@1", "prompt": "x", "request_id": "b"}))
    c = parse(QueryRequest, json.dumps({"model": "demo-tpm@1", "prompt": "y"}))
    assert request_hash(a) == request_hash(b) != request_hash(c)
