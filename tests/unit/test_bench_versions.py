"""``bench/versions.py --quick``: the version store's benchmark runs end to end on a tiny
lineage trained by ``scripts/train_chat_model.py``, and what it checks holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_is_exact_and_never_larger(tmp_path: Path) -> None:
    out = tmp_path / "versions.json"
    p = subprocess.run(
        [sys.executable, "bench/versions.py", "--quick", "--repeats", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {r["ref"]: r for r in result["rows"]}
    assert list(rows) == [
        "dense@1", "dense@2", "dense@3", "last-layers@1", "high-lr@1", "lora@1",
    ]  # fmt: skip
    targets = result["targets"]
    for name in ("bit_exact", "never_larger", "unchanged_free"):
        assert targets[name]["met"], (name, targets[name])
    for r in rows.values():
        assert r["bit_exact"] and not r["verify_problems"]
        assert 0 < r["share"]["store"] <= r["share"]["grouped_zstd"] <= 1.0
        if r["parent"]:
            assert r["bytes"]["store"] <= r["bytes"]["xor"] <= r["bytes"]["tensor_dedup"]
    # Only what trained changed: the last block (9 tensors), the final norm and lm_head; and
    # LoRA's merged q_proj and v_proj of each of the 2 layers.
    assert rows["last-layers@1"]["tensors_changed"] == 11
    assert rows["lora@1"]["tensors_changed"] == 4
    assert rows["dense@2"]["tensors_changed"] == rows["dense@2"]["tensors"]
    assert "restore" in targets and "dense_vs_xor" in targets
    assert "restore x" in p.stdout and "[PASS] bit_exact" in p.stdout
