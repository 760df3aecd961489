"""The gateway's success path and its failure paths, against the fake shard group.

Real site components (dev tokens, the bundled local-dev policy, SQLite ledger, registry) and
the real client; only the shard group is :class:`tpm_faas.testing.FakeShard`.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tpm_faas.client import Result, TPMClient
from tpm_faas.errors import ConfigError, RemoteError, ShardTimeout
from tpm_faas.gateway.ledger import to_su
from tpm_faas.gateway.pipeline import Gateway, parse, request_hash
from tpm_faas.modes import MODES
from tpm_faas.protocol.replies import EmbedOutput, InterveneOutput, QueryOutput
from tpm_faas.testing import FAKE_MODEL, FakeShard, InProcessTransport, fake_site
from tpm_faas.tokenizer import ByteTokenizer

Site = tuple[Gateway, dict[str, str], FakeShard]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return fake_site(tmp_path)


def client(site: Site, user: str = "dev") -> TPMClient:
    gw, tokens, _ = site
    return TPMClient(InProcessTransport(gw), token=tokens[user])


def _charged(gw: Gateway, project: str = "demo") -> int:
    return gw.ledger.balance(project).charged


def _assert_books(gw: Gateway, r: Result, before: int) -> None:
    """The post equals the SU reported, never exceeds the hold, and the books balance."""
    assert _charged(gw) - before == round(r.usage.su * 1e6)
    assert 0 < r.usage.su <= r.usage.su_held
    assert gw.ledger.open_holds() == []
    assert gw.ledger.reconcile().ok


def test_query_success_path(site: Site) -> None:
    gw, _, shard = site
    before = _charged(gw)
    r = client(site).generate(["And God said", "In the beginning"], max_new_tokens=5)
    assert isinstance(r.output, QueryOutput) and r.texts == ["xxxxx", "xxxxx"]
    # Usage from the shard's output: prompt tokens (BOS + bytes) and every new token.
    assert (r.usage.input_tokens, r.usage.output_tokens) == (13 + 17, 10)
    assert r.usage["output_tokens"] == 10  # the JSON's keys still answer
    assert r.usage.bytes_returned == len(json.dumps(r.raw["output"], separators=(",", ":")))
    _assert_books(gw, r, before)
    # The shard ran exactly the admitted message (no model, no request id in the body).
    (call,) = shard.calls
    assert call.op == "query" and call.request_id == r.request_id
    tok = ByteTokenizer()
    assert call.body["prompt_ids"] == [tok.encode("And God said"), tok.encode("In the beginning")]
    assert "model" not in call.body and "request_id" not in call.body
    # The receipt pins the request, the checkpoint, the policy and the versions.
    sent = {"model": "demo-tpm@1", "prompts": ["And God said", "In the beginning"]}
    request = parse(MODES["query"].request_model, json.dumps({**sent, "max_new_tokens": 5}))
    assert r.receipt.request_sha256 == request_hash(request)
    assert r.receipt.checkpoint_sha256 == FAKE_MODEL.checkpoint_sha256
    assert r.receipt.tp_size == 1 and r.receipt.seed == 0
    assert r.receipt.policy_sha256 == gw.policy.sha256
    assert r.receipt.intervention_sha256 is None and "intervention_sha256" not in r.receipt
    assert {"python", "tpm-faas", "pydantic"} <= set(r.receipt.versions)


def test_fewer_tokens_than_the_worst_case_release_the_rest(tmp_path: Path) -> None:
    site = fake_site(tmp_path, shard=FakeShard(new_tokens=2))
    gw = site[0]
    before = _charged(gw)
    r = client(site).generate("And God said", max_new_tokens=64)
    assert r.usage.output_tokens == 2
    assert r.usage.su < r.usage.su_held
    _assert_books(gw, r, before)


def test_embed_success_path(site: Site) -> None:
    gw, _, shard = site
    before = _charged(gw)
    x = np.ones((2, 3, FAKE_MODEL.hidden_size), dtype=np.float32)
    r = client(site).embed(x, pooling="last")
    assert isinstance(r.output, EmbedOutput)
    assert r.tensor().shape == (2, FAKE_MODEL.hidden_size)
    assert r.usage.input_tokens == 6 and r.receipt.seed is None
    assert shard.calls[0].body["pooling"] == "last"
    _assert_books(gw, r, before)


def _lens_and_save(site: Site) -> Result:
    return client(site).intervene(
        ["And God said", "In the beginning"],
        [
            {"op": "save", "site": "hook_resid_post", "layers": [1, 3]},
            {"op": "save", "site": "attn.hook_z", "layers": [0], "heads": [7, 0], "prompts": [1]},
            {"op": "logit_lens", "layers": "*", "top_k": 3},
        ],
        max_new_tokens=2,
    )


def test_intervene_success_path(site: Site) -> None:
    gw, _, _ = site
    before = _charged(gw)
    r = _lens_and_save(site)
    assert isinstance(r.output, InterveneOutput) and r.output.tensors_ref is None
    assert r.saved["blocks.1.hook_resid_post"].shape == (13, FAKE_MODEL.hidden_size)
    z = r.saved_entry("blocks.0.attn.hook_z", prompt=1)
    assert z.heads == [7, 0] and r.array(z.tensor).shape == (17, 2, FAKE_MODEL.head_dim)
    assert len(r.logit_lens) == FAKE_MODEL.num_layers and len(r.logit_lens[0]["top"]) == 3
    # Three block sites of resid_post and one of z: the hooked sites charged.
    assert r.usage.hooked_sites == 4 + 1
    assert r.receipt.intervention_sha256 is not None
    _assert_books(gw, r, before)


def test_large_results_go_by_reference_and_read_back(tmp_path: Path) -> None:
    site = fake_site(tmp_path, inline_limit_bytes=1000)
    gw = site[0]
    before = _charged(gw)
    r = _lens_and_save(site)
    ref = r.output.tensors_ref
    assert (
        ref is not None
        and "data"
        not in r.raw["output"]["results"][0]["saved"]["blocks.1.hook_resid_post"]["tensor"]
    )
    path = gw.settings.results_dir / ref.name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == ref.bytes
    assert r.saved["blocks.3.hook_resid_post"].shape == (13, FAKE_MODEL.hidden_size)
    # The file's bytes count as returned, once.
    assert r.usage.bytes_returned > ref.bytes
    _assert_books(gw, r, before)
    # A later request of the same caller names a saved tensor instead of sending it.
    again = client(site).intervene(
        "In the beginning",
        [
            {
                "op": "set",
                "site": "blocks.1.hook_resid_post",
                "positions": {"start": 0, "stop": 13},
                "value": {"ref": "v"},
            }
        ],
        tensors={"v": r.saved_ref("blocks.1.hook_resid_post")},
    )
    sent = site[2].calls[-1].body["tensors"]["v"]
    assert sent["shape"] == [13, FAKE_MODEL.hidden_size] and again.usage.su > 0


def _books(gw: Gateway) -> dict[str, Any]:
    return {p: gw.ledger.balance(p) for p in ("demo", "broke")}


@pytest.mark.parametrize(
    ("shard", "code", "layer"),
    [
        (FakeShard(fail=ShardTimeout("no answer")), "shard_timeout", "shard"),
        (FakeShard(reply=lambda op, body: {"completions": "nope"}), "shard_unavailable", "shard"),
        (FakeShard(reply=lambda op, body: {}), "shard_unavailable", "shard"),
    ],
)
def test_a_shard_failure_is_voided_and_charges_nothing(
    tmp_path: Path, shard: FakeShard, code: str, layer: str
) -> None:
    site = fake_site(tmp_path, shard=shard)
    gw = site[0]
    before = _books(gw)
    with pytest.raises(RemoteError) as info:
        client(site).generate("And God said", max_new_tokens=4)
    assert (info.value.code, info.value.remote_layer) == (code, layer)
    assert _books(gw) == before and gw.ledger.open_holds() == [] and gw.ledger.reconcile().ok


def test_each_refusal_layer_charges_nothing_and_never_reaches_the_shard(site: Site) -> None:
    gw, tokens, shard = site
    q = {"prompt": "And God said", "max_new_tokens": 8}
    cases: list[tuple[str, str | None, dict[str, Any], str]] = [
        ("query", tokens["dev"], {**q, "max_new_tokens": "many"}, "bad_request"),
        ("query", None, q, "token_missing"),
        ("query", "tpmdev-nobody", q, "token_invalid"),
        ("query", tokens["dev-expired"], q, "token_expired"),
        ("query", tokens["dev"], {**q, "model": "nothing@1"}, "unknown_model"),
        ("query", tokens["dev"], {**q, "max_new_tokens": 300}, "limit_exceeded"),
        ("query", tokens["broke"], q, "insufficient_su"),
        ("intervene", tokens["dev"], {**q, "ops": [{"op": "save", "site": "nowhere"}]}, ""),
    ]
    before = _books(gw)
    for mode, token, body, code in cases:
        reply = json.loads(
            InProcessTransport(gw)
            .submit(mode, json.dumps({"model": "demo-tpm@1", **body}), token)
            .result()
        )
        assert reply["ok"] is False, body
        if code:
            assert reply["error"]["code"] == code, (body, reply)
        assert reply["error"]["layer"] != "internal"
    assert shard.calls == []
    assert _books(gw) == before and gw.ledger.open_holds() == []


def test_a_retried_request_is_charged_once(site: Site) -> None:
    gw, tokens, shard = site
    body = json.dumps({"model": "demo-tpm@1", "prompt": "x", "request_id": "retry-1"})
    first = json.loads(InProcessTransport(gw).submit("query", body, tokens["dev"]).result())
    charged = _charged(gw)
    second = json.loads(InProcessTransport(gw).submit("query", body, tokens["dev"]).result())
    assert first["ok"] and second["error"]["code"] == "duplicate_request"
    assert _charged(gw) == charged and len(shard.calls) == 1
    assert to_su(charged) == pytest.approx(first["usage"]["su"])


def test_an_unknown_mode_is_a_clean_refusal(site: Site) -> None:
    reply = json.loads(InProcessTransport(site[0]).submit("train", "{}", None).result())
    assert reply["error"]["code"] == "bad_request" and "one of query" in reply["error"]["message"]


@pytest.mark.parametrize(
    ("mode", "body", "code"),
    [
        ("query", "[" * 1100 + "]" * 1100, "malformed_json"),
        ("query", '{"model": "demo-tpm@1", "prompts": ' + "[" * 1100 + "]" * 1100 + "}", ""),
        (
            "intervene",
            '{"model":"demo-tpm@1","prompt":"x","ops":[{"op":"save","site":'
            + "[" * 5000
            + "]" * 5000
            + "}]}",
            "",
        ),
        (
            "embed",
            json.dumps(
                {
                    "model": "demo-tpm@1",
                    "inputs_embeds": {"dtype": "float32", "shape": [1, 2, 256], "data": "!" * 2732},
                }
            ),
            "bad_tensor",
        ),
        (
            "embed",
            json.dumps(
                {
                    "model": "demo-tpm@1",
                    "inputs_embeds": {
                        "dtype": "float32",
                        "shape": [1, 2, 256],
                        "data": "A" * 1364 + "=" + "A" * 1367,
                    },
                }
            ),
            "bad_tensor",
        ),
    ],
)
def test_hostile_bodies_are_refused_before_the_shard(
    site: Site, mode: str, body: str, code: str
) -> None:
    """Deep nesting and undecodable base64 of the right length (issue 12, defects 1 and 2)."""
    gw, tokens, shard = site
    reply = json.loads(InProcessTransport(gw).submit(mode, body, tokens["dev"]).result())
    assert reply["ok"] is False and reply["error"]["layer"] == "request", reply
    assert code in reply["error"]["code"]
    assert shard.calls == [] and gw.ledger.open_holds() == []


@pytest.mark.parametrize("token", [["x"], {"token": "x"}, 7, "t" * 5000])
def test_a_token_that_is_not_a_token_is_invalid(site: Site, token: Any) -> None:
    """A token sent as a list or an object (issue 12, defect 3)."""
    gw, _, shard = site
    body = json.dumps({"model": "demo-tpm@1", "prompt": "x"})
    reply = json.loads(InProcessTransport(gw).submit("query", body, token).result())
    assert reply["error"]["code"] == "token_invalid" and shard.calls == []


def test_a_results_directory_too_long_to_price_is_a_config_error(tmp_path: Path) -> None:
    """Admission prices a by-reference result's URI with at most 1024 characters of results
    directory; a site whose directory is longer cannot start (the bound would not hold)."""
    home = tmp_path.joinpath(*["d" * 200] * 6)
    home.mkdir(parents=True)
    with pytest.raises(ConfigError, match="results directory's URI"):
        fake_site(home, ledger_url=f"sqlite:///{tmp_path / 'ledger.sqlite'}")
