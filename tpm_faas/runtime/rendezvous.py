"""How the ranks of a shard group find each other, on one node or across the nodes of a block.

Parsl places each rank's task on whichever worker takes it, so no rank knows in advance where
rank 0 runs or which ranks share its node. Every rank writes ``rank-<r>.json`` (its host) into
the group's rendezvous directory (on the shared file system that holds the run directory);
rank 0 also binds a free port on its own host and writes ``master.json``. Each rank then
waits for all of them and derives ``MASTER_ADDR``/``MASTER_PORT`` (loopback when every rank
shares one host), its ``LOCAL_RANK`` (its index among the ranks on its host, which picks its
GPU) and ``LOCAL_SIZE``: the environment ``torch.distributed``/DeepSpeed read, as torchrun
would set it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Placement:
    rank: int
    world: int
    local_rank: int
    local_size: int
    master_addr: str
    master_port: int

    def env(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_SIZE": str(self.local_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _address(host: str) -> str:
    """An address other hosts can reach ``host`` at (its name, where it resolves to
    loopback, as with Debian's ``127.0.1.1`` entry)."""
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        return host
    return host if addr.startswith("127.") else addr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        port: int = s.getsockname()[1]
        return port


def placement(
    directory: Path, rank: int, world: int, *, host: str | None = None, timeout_s: float = 300.0
) -> Placement:
    """Join the rendezvous in ``directory`` as ``rank`` of ``world``; wait for the others."""
    directory.mkdir(parents=True, exist_ok=True)
    host = host or socket.gethostname()
    _write(directory / f"rank-{rank}.json", {"rank": rank, "host": host, "pid": os.getpid()})
    if rank == 0:
        _write(
            directory / "master.json", {"host": host, "addr": _address(host), "port": _free_port()}
        )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            master = json.loads((directory / "master.json").read_text())
            hosts = [
                json.loads((directory / f"rank-{r}.json").read_text())["host"] for r in range(world)
            ]
            break
        except (FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                have = sorted(p.name for p in directory.glob("*.json"))
                raise TimeoutError(
                    f"rank {rank}: the shard group's ranks did not all arrive within "
                    f"{timeout_s:.0f} s (present: {', '.join(have) or 'none'})"
                ) from None
            time.sleep(0.05)
    mine = [r for r in range(world) if hosts[r] == host]
    single_host = len(set(hosts)) == 1
    return Placement(
        rank=rank,
        world=world,
        local_rank=mine.index(rank),
        local_size=len(mine),
        master_addr="127.0.0.1" if single_host else str(master["addr"]),
        master_port=int(master["port"]),
    )
