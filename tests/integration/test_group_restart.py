"""A rank that dies makes its group unhealthy; the launcher restarts the group."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tpm_faas.config import Settings
from tpm_faas.launcher import ShardGroup
from tpm_faas.tokenizer import ByteTokenizer

pytestmark = pytest.mark.integration

BODY = {"prompt_ids": [ByteTokenizer().encode("And Abraham")], "max_new_tokens": 8}


def test_dead_rank_is_detected_and_the_group_restarts(tmp_path: Path) -> None:
    settings = Settings.from_env({}, home=tmp_path)
    group = ShardGroup("demo-tpm@1", 2, settings, tmp_path / "runs", max_batch=4, max_wait_ms=300)
    group.start()
    try:
        first = group.client().call("query", BODY)
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
        again = group.client().call("query", BODY)["completions"][0]["token_ids"]
        assert again == want
        old = {m["pid"] for m in ranks}
        assert not old & {m["pid"] for m in group.client().ping()["memory"]}
    finally:
        group.stop()
    for pid in (m["pid"] for m in ranks):  # nothing of the first group survives
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_replicas_scale_beat_and_are_restarted_by_the_supervisor(tmp_path: Path) -> None:
    """Two replicas registered with heartbeats; the registry spreads lookups over them; a
    killed replica is restarted by supervise(); scaling in removes one; stop removes all."""
    from tpm_faas.errors import ShardGroupError
    from tpm_faas.launcher import ReplicaSet
    from tpm_faas.registry import Registry
    from tpm_faas.shard_client import ShardClient

    settings = Settings.from_env({}, home=tmp_path)
    registry = Registry(settings.registry_dir)
    rs = ReplicaSet("demo-tpm@1", 1, settings, tmp_path / "runs")
    try:
        entries = rs.scale(2)
        assert sorted(e.replica for e in entries) == ["r0", "r1"]
        assert sorted(e.replica for e in registry.entries("demo-tpm@1")) == ["r0", "r1"]
        assert registry.models() == ["demo-tpm@1"]
        seen = {registry.lookup("demo-tpm@1").replica for _ in range(40)}
        assert seen == {"r0", "r1"}  # requests spread over the live replicas
        beat = {e.replica: e.heartbeat_at for e in registry.entries("demo-tpm@1")}
        deadline = time.monotonic() + 30  # a heartbeat period is 5 s; idle groups beat too
        while time.monotonic() < deadline and not all(
            e.heartbeat_at > beat[e.replica] for e in registry.entries("demo-tpm@1")
        ):
            time.sleep(0.5)
        assert all(e.heartbeat_at > beat[e.replica] for e in registry.entries("demo-tpm@1"))
        victim = rs.groups["r1"].client().ping()["memory"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while rs.groups["r1"].healthy() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert rs.supervise() == ["r1"]
        assert rs.supervise() == []
        out = rs.groups["r1"].client().call("query", BODY)
        assert out["completions"][0]["completion_tokens"] == 8
        rs.scale(1)
        assert [e.replica for e in registry.entries("demo-tpm@1")] == ["r0"]
        ShardClient(registry.lookup("demo-tpm@1").address).ping()
    finally:
        rs.stop()
    assert registry.entries("demo-tpm@1") == []
    # An entry whose group stopped beating is not used.
    from dataclasses import replace

    from tpm_faas.registry import GroupEntry, ModelInfo

    info = ModelInfo("demo-tpm@1", 1, 1, 1, 1, "bytes", "0", "float32")
    registry.register(GroupEntry(info, "tcp://127.0.0.1:9", 1, 0, "h", 0.0))
    registry.register(replace(registry.entries("demo-tpm@1")[0], heartbeat_at=time.time() - 99))
    with pytest.raises(ShardGroupError, match="no heartbeat"):
        registry.lookup("demo-tpm@1")
