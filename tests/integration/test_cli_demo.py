"""`tpm-faas demo --json` (what `make demo` runs) end to end, in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tpm_faas.architectures import moe_of
from tpm_faas.catalog import CARD, checkpoint_sha256
from tpm_faas.config import BUNDLED_MODELS
from tpm_faas.tokenizer import HFTokenizer

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("tp", [1, 2])
def test_demo_json(tp: int, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "tpm-faas"
    env = {**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [str(exe), "demo", "--json", "--tp", str(tp), "--home", str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] and summary["tp_size"] == tp and summary["model"] == "demo-chat@1"
    modes = summary["modes"]
    model_dir = BUNDLED_MODELS / "demo-chat" / "1"
    sha = checkpoint_sha256(model_dir)  # the card's hash covers the registered extras too
    assert json.loads((model_dir / CARD).read_text())["checkpoint_sha256"] == sha
    assert set(modes) >= {"query_chat", "query", "embed_text", "embed", "intervene"}
    for mode in modes.values():
        assert mode["ok"] and mode["su"] > 0
        assert mode["usage"]["su"] == mode["su"]
        assert mode["receipt"]["model"] == "demo-chat@1"
        assert mode["receipt"]["checkpoint_sha256"] == sha
    # The chat: an answer that ends at the end of its turn, log-probs of real tokens.
    vocab = _vocabulary()
    chat = modes["query_chat"]
    assert chat["text"].strip() and chat["finish_reason"] == "stop"
    assert chat["logprobs"] and all(e["token"] in vocab for e in chat["logprobs"])
    assert modes["query"]["text"].strip()
    # The logit lens names tokens of the checkpoint's own vocabulary (words, not bytes).
    lens = modes["intervene"]["logit_lens"]
    tokens = [t for row in lens for t in row["top"]]
    assert len(lens) == 4 and all(len(row["top"]) == 5 for row in lens)
    assert all(t in vocab for t in tokens)
    assert any(len(t.strip()) > 2 for t in tokens)
    _check_moe(summary["moe"])
    assert summary["ledger"]["open_holds"] == 0
    # + the steering source read
    assert summary["ledger"]["charges"] == len(modes) + len(summary["moe"]["modes"]) + 1
    assert not any(p.is_file() for p in (tmp_path / "home" / "registry").glob("*.json"))
    # No rank, worker pool or interchange outlives the demo.
    ps = subprocess.run(["ps", "-ww", "-eo", "stat,args"], capture_output=True, text=True).stdout
    alive = [
        ln for ln in ps.splitlines() if str(tmp_path) in ln and not ln.lstrip().startswith("Z")
    ]
    assert alive == []


def _check_moe(moe: dict[str, Any]) -> None:
    """``demo-moe@1``, served beside the chat model: its chat answer, the routing table read
    at its router's hook sites, the chat with an expert knocked out."""
    model_dir = BUNDLED_MODELS / "demo-moe" / "1"
    sha = checkpoint_sha256(model_dir)
    routed = moe_of(json.loads((model_dir / "config.json").read_text()))
    assert routed is not None and routed.num_experts == 8 and routed.top_k == 2
    n_experts, top_k = routed.num_experts, routed.top_k
    assert moe["model"] == "demo-moe@1" and moe["tp_size"] == 1
    assert set(moe["modes"]) == {"query_chat", "intervene_routing", "intervene_drop_experts"}
    for mode in moe["modes"].values():
        assert mode["ok"] and mode["su"] > 0
        assert mode["receipt"]["model"] == "demo-moe@1"
        assert mode["receipt"]["checkpoint_sha256"] == sha
    chat = moe["modes"]["query_chat"]
    assert chat["text"].strip() and chat["finish_reason"] == "stop"
    # Rows: the prompt's tokens as the model's tokenizer splits it; columns: the MoE layers
    # (every layer but the dense ones); cells: top_k distinct experts, heaviest first, with
    # their weights (renormalised: they sum to 1).
    routing = moe["routing"]
    assert routing["layers"] == list(routed.layers) == [1, 2, 3]  # layer 0 is dense
    tok = HFTokenizer(model_dir)
    ids = tok.encode(routing["prompt"])
    assert [r["token"] for r in routing["rows"]] == [tok.token_str(i) for i in ids]
    assert [r["position"] for r in routing["rows"]] == list(range(len(ids)))
    used: list[set[int]] = [set() for _ in routing["layers"]]
    for row in routing["rows"]:
        assert len(row["experts"]) == len(row["weights"]) == len(routing["layers"])
        for seen, experts, weights in zip(used, row["experts"], row["weights"], strict=True):
            assert len(set(experts)) == len(experts) == top_k
            assert all(0 <= e < n_experts for e in experts)
            assert weights == sorted(weights, reverse=True) and abs(sum(weights) - 1) < 1e-3
            seen.update(experts)
    # The load-balancing loss it was trained with: a few tokens already spread over experts.
    assert all(len(seen) > top_k for seen in used)
    drop = moe["modes"]["intervene_drop_experts"]
    assert drop["layer"] == routing["layers"][0] and 0 <= drop["expert"] < n_experts
    assert drop["text"].strip()


def _vocabulary() -> set[str]:
    """Every token of ``demo-chat@1`` as the site prints it."""
    tok = HFTokenizer(BUNDLED_MODELS / "demo-chat" / "1")
    return {tok.token_str(i) for i in range(tok.vocab_size)}
