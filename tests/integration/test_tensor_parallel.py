"""tp=2 (two DeepSpeed AutoTP ranks over gloo, started through Parsl) equals tp=1."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tpm_faas.client import decode_array, encode_array
from tpm_faas.config import Settings
from tpm_faas.launcher import ShardGroup
from tpm_faas.shard_client import ShardClient
from tpm_faas.testing.embedded import EmbeddedSite
from tpm_faas.tokenizer import ByteTokenizer

pytestmark = pytest.mark.integration

PROMPTS = ["And God said, Let there be", "In the beginning", "And Abraham"]
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShardClient]:
    home = tmp_path_factory.mktemp("tp2")
    group = ShardGroup("demo-tpm@1", 2, Settings.from_env({}, home=home), home / "runs")
    group.start()
    try:
        yield group.client()
    finally:
        group.stop()
    assert not group.healthy()


def _tp1(site: EmbeddedSite) -> ShardClient:
    from tpm_faas.registry import Registry

    return ShardClient(Registry(site.settings.registry_dir).lookup("demo-tpm@1").address)


def test_group_reports_two_ranks(tp2: ShardClient) -> None:
    assert tp2.ping()["tp_size"] == 2


def test_greedy_text_identical(site: EmbeddedSite, tp2: ShardClient) -> None:
    body = {
        "prompt_ids": [TOK.encode(p) for p in PROMPTS],
        "max_new_tokens": 32,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "stop_at_eos": True,
        "logprobs": True,
    }
    one = _tp1(site).call("query", body)["completions"]
    two = tp2.call("query", body)["completions"]
    assert [c["token_ids"] for c in one] == [c["token_ids"] for c in two]
    lp1 = np.array([e["logprob"] for c in one for e in c["logprobs"]])
    lp2 = np.array([e["logprob"] for c in two for e in c["logprobs"]])
    np.testing.assert_allclose(lp1, lp2, atol=1e-4)


def _spec(site: EmbeddedSite, request: dict[str, Any]) -> dict[str, Any]:
    """A request normalised and priced as the gateway does (generous limits)."""
    from _serving import WRITES

    from tpm_faas.modes import MODES
    from tpm_faas.protocol.requests import InterveneRequest
    from tpm_faas.registry import Registry

    info = Registry(site.settings.registry_dir).lookup("demo-tpm@1").model
    req = InterveneRequest.model_validate({"model": "demo-tpm@1", **request})
    return MODES["intervene"].admit(req, info, WRITES).body


def test_every_site_within_tolerance(site: EmbeddedSite, tp2: ShardClient) -> None:
    """Every hook site (per-head z gathered from both ranks), the logit lens, and writes on
    heads split across the ranks give the same values on tp=2 as on tp=1."""
    from tpm_faas.sites import ModelShape, all_sites

    shape = ModelShape("llama", 4, 256, 8, 32, 264)
    vec = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    body = _spec(
        site,
        {
            "prompts": [PROMPTS[0], PROMPTS[1]],
            "max_new_tokens": 6,
            "ops": [
                {
                    "op": "save",
                    "site": "blocks.2.attn.hook_z",
                    "heads": [6, 1, 4],
                    "positions": [-1, 0],
                }
            ]
            + [{"op": "save", "site": s.name, "positions": [0, 3, -1]} for s in all_sites(shape)]
            + [
                {"op": "logit_lens", "positions": [-1, 2], "top_k": 5},
                # heads 3..4 straddle the ranks (0-3 on rank 0, 4-7 on rank 1)
                {
                    "op": "scale_heads",
                    "layers": [1],
                    "heads": [3, 4],
                    "scale": 0.5,
                    "generation": True,
                },
                {
                    "op": "add",
                    "site": "blocks.2.hook_resid_mid",
                    "vector": encode_array(vec),
                    "prompts": [1],
                    "generation": True,
                },
                {"op": "save", "site": "blocks.3.attn.hook_z", "heads": [2, 6], "generation": True},
            ],
        },
    )
    one, two = _tp1(site).call("intervene", body), tp2.call("intervene", body)
    for r1, r2 in zip(one["results"], two["results"], strict=True):
        assert r1["token_ids"] == r2["token_ids"]
        assert set(r1["saved"]) == set(r2["saved"]) and len(r1["saved"]) == 4 * 6 + 3
        z2 = r2["saved"]["blocks.2.attn.hook_z"]
        assert z2["heads"] == [6, 1, 4, 0, 2, 3, 5, 7] and z2["positions"] == [
            r1["prompt_tokens"] - 1,
            0,
            3,
        ]
        assert r1["saved"]["blocks.2.attn.hook_z"]["heads"] == z2["heads"]
        for name in r1["saved"]:
            a = decode_array(r1["saved"][name]["tensor"])
            b = decode_array(r2["saved"][name]["tensor"])
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
        z = r1["saved"]["blocks.3.attn.hook_z"]  # merged with the save of every site above
        n = r1["prompt_tokens"]
        first = [0, 3, n - 1]
        rest = [p for p in range(n) if p not in first]
        assert z["positions"] == [*first, *rest, *range(n, n + r1["completion_tokens"] - 1)]
        assert z["tensor"]["shape"] == [len(z["positions"]), 8, 32]
        assert [[t["id"] for t in r["top"]] for r in r1["logit_lens"]] == [
            [t["id"] for t in r["top"]] for r in r2["logit_lens"]
        ]


def test_embed_within_tolerance(site: EmbeddedSite, tp2: ShardClient) -> None:
    from tpm_faas.client import encode_array

    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    body = {
        "adapter": "features-linear",
        "adapter_input": encode_array(x),
        "head": None,
        "pooling": "mean",
    }
    a = decode_array(_tp1(site).call("embed", body)["output"])
    b = decode_array(tp2.call("embed", body)["output"])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bad_request_does_not_stall_the_ranks(tp2: ShardClient) -> None:
    from tpm_faas.errors import TPMError

    with pytest.raises(TPMError):
        tp2.call(
            "intervene",
            {
                "prompt_ids": [TOK.encode("x")],
                "ops": [
                    {
                        "op": "save",
                        "sites": ["blocks.99.hook_resid_post"],
                        "prompts": [0],
                        "positions": [[0]],
                        "heads": None,
                        "generation": False,
                    }
                ],
                "max_new_tokens": 0,
                "seed": 0,
            },
        )
    out = tp2.call(
        "query",
        {
            "prompt_ids": [TOK.encode("And")],
            "max_new_tokens": 3,
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": 0,
            "stop_at_eos": True,
        },
    )
    assert out["completions"][0]["completion_tokens"] == 3


def test_concurrent_requests_batch_across_ranks(site: EmbeddedSite, tp2: ShardClient) -> None:
    """Eight clients at once on the tp=2 group: batched together, each as if alone on tp=1."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [*PROMPTS, "Now the serpent", "And Jacob", "And Noah", "These are", "And Sarah"]

    def body(p: str) -> dict[str, object]:
        return {"prompt_ids": [TOK.encode(p)], "max_new_tokens": 24, "temperature": 0.0, "seed": 0}

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: tp2.call("query", body(p)), prompts))
    one = _tp1(site)
    for p, r in zip(prompts, together, strict=True):
        alone = one.call("query", body(p))
        assert r["completions"][0]["token_ids"] == alone["completions"][0]["token_ids"], p
    assert max(r["timing"]["max_batch"] for r in together) > 1


def test_each_rank_reads_only_its_shard(site: EmbeddedSite, tp2: ShardClient) -> None:
    whole = _tp1(site).ping()["memory"]
    halves = tp2.ping()["memory"]
    assert [m["rank"] for m in halves] == [0, 1] and len(whole) == 1
    for m in halves:
        # Only the replicated embedding and norms are read twice.
        assert m["weights_mb"] < 0.6 * whole[0]["weights_mb"], (m, whole)
        assert m["peak_rss_mb"] > 0
