"""Ranks find each other through the rendezvous directory, on one host or several."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tpm_faas.runtime.rendezvous import placement


def test_ranks_on_two_hosts_get_local_ranks_and_rank_0s_address(tmp_path: Path) -> None:
    hosts = ["node-a", "node-b", "node-a", "node-b"]
    with ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(lambda r: placement(tmp_path, r, 4, host=hosts[r], timeout_s=10), range(4))
        )
    assert [p.local_rank for p in got] == [0, 0, 1, 1]
    assert {p.local_size for p in got} == {2}
    assert len({(p.master_addr, p.master_port) for p in got}) == 1
    assert got[0].master_addr != "127.0.0.1"  # other hosts must reach rank 0's host
    assert got[3].env()["LOCAL_RANK"] == "1" and got[3].env()["WORLD_SIZE"] == "4"


def test_one_host_uses_loopback(tmp_path: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda r: placement(tmp_path, r, 2, timeout_s=10), range(2)))
    assert [p.local_rank for p in got] == [0, 1] and got[0].master_addr == "127.0.0.1"


def test_a_missing_rank_times_out_with_what_is_there(tmp_path: Path) -> None:
    (tmp_path / "rank-0.json").write_text('{"host": "x"}')  # rank 0 never wrote master.json
    with pytest.raises(TimeoutError, match=r"present: rank-0\.json, rank-1\.json"):
        placement(tmp_path, 1, 3, timeout_s=0.3)
