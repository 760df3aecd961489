"""A rank that dies makes its group unhealthy; the launcher restarts the group."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tpm_faas.config import Settings
from tpm_faas.launcher import ShardGroup

pytestmark = pytest.mark.integration

BODY = {"prompts": ["And Abraham"], "max_new_tokens": 8}


def test_dead_rank_is_detected_and_the_group_restarts(tmp_path: Path) -> None:
    settings = Settings.from_env({}, home=tmp_path)
    group = ShardGroup("demo-tpm@1", 2, settings, tmp_path / "runs", max_batch=4, max_wait_ms=300)
    group.start()
    try:
        first = group.client().call("generate", BODY)
        want = first["completions"][0]["token_ids"]
        # An idle group holds a lone request up to max_wait_ms for others to batch with.
        assert first["timing"]["queue_s"] >= 0.25
        assert group.client().ping()["max_batch"] == 4
        ranks = group.client().ping()["memory"]
        assert group.healthy()
        os.kill(ranks[1]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while group.healthy() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not group.healthy()
        group.restart()
        assert group.healthy()
        again = group.client().call("generate", BODY)["completions"][0]["token_ids"]
        assert again == want
        old = {m["pid"] for m in ranks}
        assert not old & {m["pid"] for m in group.client().ping()["memory"]}
    finally:
        group.stop()
    for pid in (m["pid"] for m in ranks):  # nothing of the first group survives
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
