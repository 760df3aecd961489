"""Expert parallelism: a mixture of experts served by two ranks, each holding half the routed
experts, equals the same model served whole (ep=1).

Each configuration is one real shard group (Parsl, gloo, the checkpoint read by shard) of two
ranks: Qwen3-MoE at tp=2, ep=2 (attention split by DeepSpeed AutoTP, its dense first layer
too, and the experts split over the same ranks) and DeepSeek-V3 at tp=1, ep=2 (multi-head
latent attention replicated, experts split, the shared expert whole on each rank). The
reference is the serving runtime at tp=ep=1 in this process (:meth:`ModelRunner.load`, the
same scheduler and decoder), itself equal to ``transformers`` (tests/unit/test_moe_exact.py).
One launch per configuration, several checks per launch: greedy tokens and log-probs, the
residual stream and the MoE sites (router logits, chosen experts and weights, routed and shared
outputs), a knock-out of experts on both ranks, embed mode (``transformers``' own forward
under EP), requests sent concurrently equal to alone, and each rank's memory: it read the
non-expert weights and half the experts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _families import random_model, save_checkpoint
from _serving import WRITES, served_alone

from tpm_faas import catalog
from tpm_faas.client import decode_array
from tpm_faas.config import Settings
from tpm_faas.launcher import ShardGroup
from tpm_faas.modes import MODES
from tpm_faas.protocol.requests import InterveneRequest
from tpm_faas.registry import Registry
from tpm_faas.runtime.model_store import weight_files
from tpm_faas.runtime.runner import ModelRunner
from tpm_faas.shard_client import ShardClient
from tpm_faas.sites import ModelShape
from tpm_faas.tokenizer import ByteTokenizer

pytestmark = pytest.mark.integration

TOK = ByteTokenizer()
PROMPTS = [
    TOK.encode("And God said, Let there be"),
    TOK.encode("In the beginning God created the heaven and the earth."),
    [TOK.bos_id, 3, 250, 17, 17, 120],
]
NEW = 8
#: family -> (tp, ep) of the group under test.
LAYOUTS = {"qwen3_moe": (2, 2), "deepseek_v3": (1, 2)}


def _ref(family: str) -> str:
    return f"ep-{family.replace('_', '-')}@1"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """The in-process reference on one thread, as each rank of the group runs on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("moe")
    for family in LAYOUTS:
        save_checkpoint(random_model(family), base / _ref(family).replace("@", "/"), byte_card=True)
    return base


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(
    request: pytest.FixtureRequest, root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One family served by a real two-rank group under expert parallelism, and at tp=ep=1 in
    this process."""
    family: str = request.param
    tp, ep = LAYOUTS[family]
    model_dir = root / _ref(family).replace("@", "/")
    home = tmp_path_factory.mktemp(f"ep-{family}")
    settings = Settings.from_env({"TPM_FAAS_MODELS": str(root)}, home=home)
    group = ShardGroup(_ref(family), tp, settings, home / "runs", max_batch=4, ep_size=ep)
    group.start()
    try:
        one = ModelRunner.load(_ref(family), model_dir, dtype="float32", tp_size=1)
        one.attach_decoder(slots=4, max_len=128)
        config = json.loads((model_dir / "config.json").read_text())
        yield {
            "family": family,
            "group": group,
            "ep2": group.client(),
            "ep1": one,
            "info": catalog.model_info(_ref(family), model_dir),
            "shape": ModelShape.from_config(config),
            "model_dir": model_dir,
            "registry": Registry(settings.registry_dir),
        }
    finally:
        group.stop()
    assert not group.healthy()


def _ep1(runner: ModelRunner, op: str, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` served whole at tp=ep=1 in this process."""
    assert runner.decoder is not None
    return served_alone(runner.decoder, op, body, TOK)


def _admit(pair: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    req = InterveneRequest.model_validate({"model": _ref(pair["family"]), **request})
    return MODES["intervene"].admit(req, pair["info"], WRITES).body


def _query(prompts: list[list[int]]) -> dict[str, Any]:
    return {
        "prompt_ids": prompts,
        "max_new_tokens": NEW,
        "temperature": 0.0,
        "seed": 0,
        "stop_at_eos": False,
        "logprobs": True,
    }


def test_group_and_registry_report_the_layout(pair: dict[str, Any]) -> None:
    tp, ep = LAYOUTS[pair["family"]]
    info = pair["ep2"].ping()
    assert (info["tp_size"], info["ep_size"], info["size"]) == (tp, ep, 2)
    [entry] = pair["registry"].entries(_ref(pair["family"]))
    assert (entry.tp_size, entry.ep_size, entry.size) == (tp, ep, 2)
    described = pair["group"].describe()
    assert (described["tp"], described["ep"], described["size"]) == (tp, ep, 2)
    assert len(described["ranks"]) == 2


def test_each_rank_reads_half_the_experts(pair: dict[str, Any]) -> None:
    """``weights_mb``: the checkpoint bytes each rank read. Under ep=2 that is everything but
    the routed experts (split too where tp=2) plus half of them."""
    files = weight_files(pair["model_dir"])
    experts = sum(e.end - e.begin for n, e in files.items() if ".experts." in n)
    whole = pair["ep1"].weight_bytes
    assert experts > whole / 3  # the experts are most of these models
    memory = pair["ep2"].call("info", {})["memory"]
    assert [m["rank"] for m in memory] == [0, 1] and len({m["pid"] for m in memory}) == 2
    for m in memory:
        mib = m["weights_mb"] * 2**20
        if LAYOUTS[pair["family"]][0] == 1:  # everything else whole on each rank
            assert abs(mib - (whole - experts / 2)) <= 0.006 * 2**20, m
        else:  # attention, the dense layer and the LM head split as well
            assert experts / 2 <= mib <= whole - experts / 2 + 0.006 * 2**20, m


def test_greedy_tokens_and_logprobs_equal_ep1(pair: dict[str, Any]) -> None:
    two = pair["ep2"].call("query", _query(PROMPTS))["completions"]
    one = _ep1(pair["ep1"], "query", _query(PROMPTS))["completions"]
    assert [c["token_ids"] for c in two] == [c["token_ids"] for c in one]
    assert all(len(c["token_ids"]) == NEW for c in two)
    lp1 = np.array([e["logprob"] for c in one for e in c["logprobs"]])
    lp2 = np.array([e["logprob"] for c in two for e in c["logprobs"]])
    np.testing.assert_allclose(lp2, lp1, atol=1e-4)


def test_concurrent_requests_equal_alone(pair: dict[str, Any]) -> None:
    """Each prompt its own request, all sent at once (decoded together by the scheduler), equals
    the same prompt served alone at ep=1."""
    address = pair["ep2"].address
    out: dict[int, Any] = {}

    def send(i: int) -> None:
        out[i] = ShardClient(address).call("query", _query([PROMPTS[i]]))["completions"][0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, prompt in enumerate(PROMPTS):
        alone = _ep1(pair["ep1"], "query", _query([prompt]))["completions"][0]
        assert out[i]["token_ids"] == alone["token_ids"], i
        np.testing.assert_allclose(
            [e["logprob"] for e in out[i]["logprobs"]],
            [e["logprob"] for e in alone["logprobs"]],
            atol=1e-4,
        )


def test_residual_stream_and_moe_sites_equal_ep1(pair: dict[str, Any]) -> None:
    """Sites before and after the experts' all-reduce, the router's view (logits, chosen
    experts, their weights) and the routed and shared outputs, in the prompt and during
    generation."""
    shape = pair["shape"]
    moe = list(shape.moe_layers)
    last = shape.num_layers - 1
    ops: list[dict[str, Any]] = [
        {"op": "save", "site": "hook_resid_post", "layers": [0, last]},
        {"op": "save", "site": "hook_mlp_out", "layers": moe},
        {"op": "save", "site": "mlp.hook_router_logits", "layers": moe},
        {"op": "save", "site": "mlp.hook_expert_indices", "layers": moe},
        {"op": "save", "site": "mlp.hook_expert_weights", "layers": moe},
        {"op": "save", "site": "mlp.hook_routed_out", "layers": moe[-1:]},
        {"op": "save", "site": f"blocks.{last}.hook_mlp_out", "generation": True},
        {"op": "logit_lens", "positions": [-1], "top_k": 3},
    ]
    if shape.shared_experts:
        ops.append({"op": "save", "site": "mlp.hook_shared_out", "layers": moe[:1]})
    prompts = ["And God said, Let there be", "In the beginning"]
    body = _admit(pair, {"prompts": prompts, "max_new_tokens": 5, "ops": ops})
    two = pair["ep2"].call("intervene", body)["results"]
    one = _ep1(pair["ep1"], "intervene", body)["results"]
    for r1, r2 in zip(one, two, strict=True):
        assert r2["token_ids"] == r1["token_ids"]
        assert set(r2["saved"]) == set(r1["saved"])
        for name, e1 in r1["saved"].items():
            a, b = decode_array(e1["tensor"]), decode_array(r2["saved"][name]["tensor"])
            assert a.shape == b.shape, name
            if name.endswith("hook_expert_indices"):
                np.testing.assert_array_equal(b, a, err_msg=name)
            else:
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
        assert [[t["id"] for t in r["top"]] for r in r2["logit_lens"]] == [
            [t["id"] for t in r["top"]] for r in r1["logit_lens"]
        ]


def test_knocking_out_experts_on_both_ranks_equals_ep1(pair: dict[str, Any]) -> None:
    """``drop_experts`` on the first expert of each rank's half (and during generation): the
    routing renormalised over the others, the same under ep=2 as whole."""
    shape = pair["shape"]
    half = shape.num_experts // 2
    moe = list(shape.moe_layers)
    ops = [
        {"op": "drop_experts", "layers": moe, "experts": [0, half], "generation": True},
        {"op": "save", "site": "mlp.hook_expert_indices", "layers": moe},
        {"op": "save", "site": "hook_resid_post", "layers": [shape.num_layers - 1]},
    ]
    body = _admit(pair, {"prompts": ["In the beginning"], "max_new_tokens": 5, "ops": ops})
    two = pair["ep2"].call("intervene", body)["results"]
    one = _ep1(pair["ep1"], "intervene", body)["results"]
    [r1], [r2] = one, two
    assert r2["token_ids"] == r1["token_ids"]
    for name, e1 in r1["saved"].items():
        a, b = decode_array(e1["tensor"]), decode_array(r2["saved"][name]["tensor"])
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
        if name.endswith("hook_expert_indices"):
            assert not np.isin(a, [0, half]).any()  # the dropped experts were never chosen


def test_embed_runs_transformers_forward_under_ep(pair: dict[str, Any]) -> None:
    """Embed mode calls the model's own core (``transformers``' forward, MoE blocks replaced):
    the pooled states of ep=2 equal ep=1."""
    body = {"input_ids": PROMPTS, "pooling": "mean"}
    two = decode_array(pair["ep2"].call("embed", body)["output"])
    one = decode_array(pair["ep1"].embed(body)["output"])
    assert two.shape == (len(PROMPTS), pair["info"].hidden_size)
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
