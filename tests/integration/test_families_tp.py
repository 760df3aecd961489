"""tp=2 equals tp=1 for every family DeepSpeed AutoTP shards.

Each family's small random checkpoint (:mod:`_families`, written as published, byte card) is
served by a real shard group of two ranks (Parsl, gloo, the checkpoint read by shard); the
reference is the serving runtime at tp=1 in this process (the same scheduler and decoder over
the same checkpoint, loaded whole), itself equal to ``transformers`` (tests/unit/
test_families_exact.py). The shapes are awkward on purpose: grouped-query heads split over
the ranks, ``head_dim`` unequal to ``hidden / heads``, tied embeddings (``llama3.1``,
``qwen2``), and widths of 64 that AutoTP splits unevenly (its grain is 64 columns: one rank
holds the whole ``lm_head`` and the other none of it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _families import random_model, save_checkpoint
from _serving import WRITES, served_alone

from tpm_faas import catalog
from tpm_faas.architectures import SUPPORTED
from tpm_faas.client import decode_array
from tpm_faas.config import Settings
from tpm_faas.launcher import ShardGroup
from tpm_faas.modes import MODES
from tpm_faas.protocol.requests import InterveneRequest
from tpm_faas.runtime.decoder import Decoder
from tpm_faas.tokenizer import ByteTokenizer

pytestmark = pytest.mark.integration

#: Llama 3.1 (llama3 RoPE, tied), Mistral (sliding window), Qwen2 (q/k/v biases, tied),
#: Qwen3 (q/k norms); plain Llama is the shape of the demo model (test_tensor_parallel.py).
FAMILIES = ["llama3.1", "mistral", "qwen2", "qwen3"]
TOK = ByteTokenizer()
PROMPTS = [
    TOK.encode("And God said, Let there be"),
    TOK.encode("In the beginning God created the heaven and the earth."),
    [TOK.bos_id, 3, 250, 17, 17, 120],
]
NEW = 10


def _ref(family: str) -> str:
    return f"tiny-{family.replace('.', '-')}@1"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family's checkpoint under one model root, as ``<root>/<name>/<version>/``."""
    base = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        save_checkpoint(random_model(family), base / _ref(family).replace("@", "/"), byte_card=True)
    return base


@pytest.fixture(scope="module", params=FAMILIES)
def pair(
    request: pytest.FixtureRequest, root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One family served at tp=2 by a real group, and at tp=1 in this process."""
    family: str = request.param
    model_dir = root / _ref(family).replace("@", "/")
    assert SUPPORTED[
        json.loads((model_dir / "config.json").read_text())["model_type"]
    ].tensor_parallel
    home = tmp_path_factory.mktemp(f"tp2-{family}")
    settings = Settings.from_env({"TPM_FAAS_MODELS": str(root)}, home=home)
    group = ShardGroup(_ref(family), 2, settings, home / "runs", max_batch=4)
    group.start()
    try:
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        yield {
            "family": family,
            "tp2": group.client(),
            "tp1": Decoder(model, slots=4, max_len=128),
            "model": model,
            "info": catalog.model_info(_ref(family), model_dir),
        }
    finally:
        group.stop()
    assert not group.healthy()


def test_group_shards_over_two_ranks(pair: dict[str, Any]) -> None:
    info = pair["tp2"].ping()
    assert info["tp_size"] == 2


def test_greedy_query_tokens_and_logprobs_equal_tp1(pair: dict[str, Any]) -> None:
    body = {
        "prompt_ids": PROMPTS,
        "max_new_tokens": NEW,
        "temperature": 0.0,
        "seed": 0,
        "stop_at_eos": True,
        "logprobs": True,
    }
    two = pair["tp2"].call("query", body)["completions"]
    one = served_alone(pair["tp1"], "query", body, TOK)["completions"]
    assert [c["token_ids"] for c in two] == [c["token_ids"] for c in one]
    assert all(len(c["token_ids"]) > 0 for c in two)
    lp1 = np.array([e["logprob"] for c in one for e in c["logprobs"]])
    lp2 = np.array([e["logprob"] for c in two for e in c["logprobs"]])
    np.testing.assert_allclose(lp2, lp1, atol=1e-4)
    with torch.no_grad():  # and tp=1 is transformers' greedy generate
        out = pair["model"].generate(
            torch.tensor([PROMPTS[1]]), max_new_tokens=NEW, do_sample=False
        )
    assert two[1]["token_ids"] == [int(t) for t in out[0, len(PROMPTS[1]) :]]


def test_saved_sites_and_head_writes_equal_tp1(pair: dict[str, Any]) -> None:
    """Sites on both sides of the all-reduces, per-head z gathered from both ranks (heads in
    the order asked, straddling the ranks' shares), a head write straddling them during
    generation, and the logit lens."""
    info = pair["info"]
    last = info.num_layers - 1
    heads = info.num_heads
    straddle = [heads // 2 - 1, heads // 2]  # the last head of rank 0, the first of rank 1
    request = {
        "model": _ref(pair["family"]),
        "prompts": ["And God said, Let there be", "In the beginning"],
        "max_new_tokens": 6,
        "ops": [
            {"op": "save", "site": "blocks.0.attn.hook_z", "heads": [heads - 1, 0, *straddle]},
            {"op": "save", "site": "blocks.0.hook_attn_out", "positions": [0, -1]},
            {"op": "save", "site": "hook_mlp_out", "layers": [last]},
            {"op": "save", "site": "unembed", "positions": [-1]},
            {"op": "save", "site": f"blocks.{last}.attn.hook_z", "generation": True},
            {
                "op": "scale_heads",
                "layers": [0],
                "heads": straddle,
                "scale": 0.25,
                "generation": True,
            },
            {"op": "logit_lens", "positions": [-1], "top_k": 3},
        ],
    }
    req = InterveneRequest.model_validate(request)
    body = MODES["intervene"].admit(req, info, WRITES).body
    two = pair["tp2"].call("intervene", body)["results"]
    one = served_alone(pair["tp1"], "intervene", body, TOK)["results"]
    for r1, r2 in zip(one, two, strict=True):
        assert r2["token_ids"] == r1["token_ids"]
        assert set(r2["saved"]) == set(r1["saved"]) and len(r1["saved"]) == 5
        for name, e1 in r1["saved"].items():
            e2 = r2["saved"][name]
            assert e2["positions"] == e1["positions"] and e2.get("heads") == e1.get("heads")
            a, b = decode_array(e1["tensor"]), decode_array(e2["tensor"])
            assert a.shape == b.shape, name
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)
        z = r2["saved"]["blocks.0.attn.hook_z"]
        assert z["heads"] == [heads - 1, 0, *straddle]
        assert [[t["id"] for t in r["top"]] for r in r2["logit_lens"]] == [
            [t["id"] for t in r["top"]] for r in r1["logit_lens"]
        ]
