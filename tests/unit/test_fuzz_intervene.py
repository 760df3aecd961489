"""Property-based tests of the request parser and the intervention-spec validator.

Whatever arrives, the gateway answers with a clear error (a code and a message) or admits a
spec it has fully normalised; it never crashes, never reaches the shard group for a refused
request, and never charges a request that failed.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from _gateway import DEMO_INFO, dead_shard_gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpm_faas.errors import TPMError
from tpm_faas.gateway.pipeline import Gateway, parse
from tpm_faas.modes import MODES
from tpm_faas.protocol.requests import InterveneRequest
from tpm_faas.sites import BLOCK_SITES, GLOBAL_SITES

INFO = DEMO_INFO
OPS = ["save", "set", "add", "ablate", "patch", "scale_heads", "logit_lens", "exec", ""]
SITES = [
    *BLOCK_SITES,
    *GLOBAL_SITES,
    "blocks.1.hook_resid_post",
    "blocks.9.attn.hook_z",
    "blocks.-1.hook_mlp_out",
    "blocks.01.hook_resid_post",  # one spelling per site (issue 12): no leading zero,
    "blocks.\u0661.hook_resid_post",  # no non-ASCII digit
    "blocks.1.hook_resid_post\n",
    "hook_q",
    "__import__('os')",
    "",
]

ints = st.integers(min_value=-70000, max_value=70000) | st.sampled_from([0, 1, -1, 3, 4, 8, 26])
json_scalar = st.none() | st.booleans() | ints | st.floats(allow_nan=True) | st.text(max_size=8)


@st.composite
def tensors(draw: st.DrawFn) -> Any:
    dtype = draw(st.sampled_from(["float32", "bfloat16", "int64", "float64", "object"]))
    shape = draw(st.lists(st.integers(-2, 300), min_size=0, max_size=5))
    n = draw(st.sampled_from([0, 4, 8, 1024, 2048]))
    data = base64.b64encode(b"\0" * n).decode() if draw(st.booleans()) else draw(st.text())
    out = {"dtype": dtype, "shape": shape, "data": data}
    if draw(st.booleans()):
        return {"ref": draw(st.sampled_from(["v", "w", "../etc", ""]))}
    return out


selector = (
    st.none()
    | st.just("*")
    | st.lists(ints, max_size=6)
    | st.fixed_dictionaries({"start": ints, "stop": ints}, optional={"step": ints})
    | json_scalar
)


@st.composite
def ops(draw: st.DrawFn) -> dict[str, Any]:
    op: dict[str, Any] = {"op": draw(st.sampled_from(OPS))}
    fields = {
        "site": st.sampled_from(SITES),
        "layers": selector,
        "positions": selector,
        "prompts": selector,
        "heads": selector,
        "generation": st.booleans() | json_scalar,
        "vector": tensors(),
        "value": tensors(),
        "scale": st.floats(allow_nan=True, allow_infinity=True) | json_scalar,
        "method": st.sampled_from(["zero", "mean", "resample"]),
        "source": ints,
        "source_positions": selector,
        "top_k": ints,
        "code": st.text(max_size=10),
    }
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=7, unique=True)):
        op[key] = draw(fields[key])
    return op


def _vector(shape: list[int]) -> dict[str, Any]:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "float32", "shape": shape, "data": base64.b64encode(b"\0" * n).decode()}


@st.composite
def plausible_ops(draw: st.DrawFn) -> dict[str, Any]:
    """Ops close to valid: real sites and fields, indices near the edges of their ranges."""
    kind = draw(st.sampled_from(OPS[:7]))
    small = st.integers(-4, 4) | st.integers(-40, 40)
    site = draw(st.sampled_from([*BLOCK_SITES, *GLOBAL_SITES, "blocks.2.hook_resid_pre"]))
    op: dict[str, Any] = {"op": kind, "site": site}
    if site in BLOCK_SITES or draw(st.integers(0, 9)) == 0:
        op["layers"] = draw(st.just("*") | st.lists(st.integers(0, 4), min_size=1, max_size=3))
    if draw(st.booleans()):
        op["positions"] = draw(st.lists(small, min_size=1, max_size=4))
    if site == "attn.hook_z" or draw(st.integers(0, 9)) == 0:
        op["heads"] = draw(st.lists(st.integers(0, 8), min_size=1, max_size=3))
    if draw(st.integers(0, 3)) == 0:
        op["generation"] = True
    if draw(st.integers(0, 3)) == 0:
        op["prompts"] = draw(st.lists(st.integers(0, 2), min_size=1, max_size=2))
    right = (
        [264]
        if site == "unembed"
        else [len(op.get("heads", [0] * 8)), 32]
        if (site == "attn.hook_z")
        else [256]
    )
    width = draw(st.sampled_from([right, right, right, [255], [2, 256]]))
    if kind in ("set", "add"):
        op["value" if kind == "set" else "vector"] = _vector(width)
    if kind == "patch":
        op["source"] = draw(st.integers(0, 2))
    if kind == "ablate":
        op["method"] = draw(st.sampled_from(["zero", "mean"]))
    if kind in ("scale_heads", "logit_lens"):  # their default sites are block sites
        del op["site"]
        op.setdefault("layers", draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
    return op


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {
            "model": "demo-tpm@1",
            "prompts": draw(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=3)),
            "ops": draw(st.lists(plausible_ops(), min_size=1, max_size=4)),
            "max_new_tokens": draw(st.integers(0, 4)),
        }
    req: dict[str, Any] = {"model": "demo-tpm@1"}
    if draw(st.booleans()):
        req["prompt"] = draw(st.text(min_size=0, max_size=40))
    else:
        req["prompts"] = draw(st.lists(st.text(min_size=1, max_size=30), min_size=0, max_size=3))
    req["ops"] = draw(st.lists(ops(), min_size=0, max_size=4))
    if draw(st.booleans()):
        req["tensors"] = {"v": draw(tensors()), "w": draw(tensors())}
    if draw(st.booleans()):
        req["max_new_tokens"] = draw(ints)
    if draw(st.booleans()):
        req[draw(st.sampled_from(["seed", "temperature", "extra", "top_p"]))] = draw(json_scalar)
    return req


def _check_error(e: TPMError) -> None:
    assert e.code and e.code != "internal"
    assert len(e.message) > 10


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_validator_never_crashes(raw: dict[str, Any]) -> None:
    from tpm_faas.policy import Limits

    limits = Limits(
        allowed_ops=["save", "set", "add", "ablate", "patch", "scale_heads", "logit_lens"],
        write=True,
        max_prompt_tokens=64,
    )
    try:
        req = parse(InterveneRequest, json.dumps(raw))
        adm = MODES["intervene"].admit(req, INFO, limits)
    except TPMError as e:
        _check_error(e)
        return
    # Admitted: the normalised spec names only real sites and in-range indices.
    for op, asked in zip(adm.body["ops"], req.ops, strict=True):
        assert op["sites"] and all(isinstance(s, str) for s in op["sites"])
        if asked.site not in BLOCK_SITES:  # a full name is admitted only as spelled canonically
            assert op["sites"] == [asked.site]
        for pos, p in zip(op["positions"], op["prompts"], strict=True):
            assert all(0 <= i < len(req.prompts[p].encode()) + 1 for i in pos)
        assert op["heads"] is None or all(0 <= h < 8 for h in op["heads"])
    assert adm.worst.bytes_returned >= 0 and adm.worst.hooked_sites >= 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=64).map(lambda b: b.decode("latin-1")))
def test_parser_answers_any_text_with_a_clear_error(text: str) -> None:
    with pytest.raises(TPMError) as info:
        parse(InterveneRequest, text)
    _check_error(info.value)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> tuple[Gateway, dict[str, str]]:
    return dead_shard_gateway(tmp_path_factory.mktemp("fuzz-site"))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(requests(), st.sampled_from(["dev", "reader", "broke", "dev-query-only", "nobody"]))
def test_nothing_is_charged_for_a_failed_request(
    gateway: tuple[Gateway, dict[str, str]], raw: dict[str, Any], user: str
) -> None:
    gw, tokens = gateway
    before = {p: gw.ledger.balance(p) for p in ("demo", "readers", "broke")}
    with pytest.raises(TPMError) as info:  # refused, or admitted and failed at the shard
        gw.handle("intervene", json.dumps(raw), tokens.get(user, "no-such-token"))
    _check_error(info.value)
    assert gw.ledger.open_holds() == []
    for project, bal in before.items():
        assert gw.ledger.balance(project) == bal
