"""One rank of a shard group: load the model, stay warm, serve until told to stop.

Rank 0 owns a ZeroMQ ROUTER socket on loopback and registers its address. Generation and
intervention requests go to the scheduler (:mod:`tpm_faas.runtime.scheduler`), which batches
them step by step; ``embed`` runs whole between two steps. Every model call is broadcast
first (JSON bytes in a uint8 tensor: no pickles cross ranks), so all ranks run the same
forward passes; rank 0 replies. ``ping`` and ``info`` are answered by rank 0 alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import socket
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tpm_faas._extras import require
from tpm_faas.config import set_process_env
from tpm_faas.errors import RequestError, TPMError
from tpm_faas.registry import HEARTBEAT_S, GroupEntry, Registry
from tpm_faas.runtime.model_store import rank_device

log = logging.getLogger(__name__)

#: Scheduler plans every rank runs on its decoder.
PLANS = ("prefill", "decode", "release")


def serve_rank(
    rank: int,
    tp_size: int,
    rendezvous_dir: str,
    model: str,
    model_dir: str,
    registry_dir: str,
    dtype: str = "float32",
    threads: int | None = None,
    max_batch: int = 8,
    max_wait_ms: float = 0.0,
    replica: str = "",
    ep_size: int = 1,
) -> dict[str, Any]:
    """Run rank ``rank`` of a group of ``max(tp_size, ep_size)`` ranks; returns a summary when
    the group stops.

    :param tp_size: tensor-parallel ranks (1 or the group's size)
    :param ep_size: expert-parallel ranks of a mixture of experts (1 or the group's size)
    :param rendezvous_dir: where the group's ranks meet (see :mod:`.rendezvous`)
    :param max_batch: sequences decoded together at most (KV-cache slots)
    :param max_wait_ms: how long a request may wait for others to batch with while the group
        is idle (0: start at once; requests arriving later join at the next decode step)
    """
    from tpm_faas.runtime.rendezvous import placement

    size = max(tp_size, ep_size)
    where = placement(Path(rendezvous_dir), rank, size)
    # torch.distributed's env:// rendezvous and DeepSpeed read the placement from the environment.
    set_process_env(where.env())
    from tpm_faas.runtime.prebuild import use_prebuilt_ops

    use_prebuilt_ops()
    require("torch", "runtime")
    require("deepspeed", "runtime")
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // where.local_size))
    import deepspeed
    import deepspeed.comm

    from tpm_faas.runtime.runner import ModelRunner

    if torch.cuda.is_available():
        torch.cuda.set_device(where.local_rank)  # one GPU per rank, before NCCL starts
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    if dtype == "float32" and not torch.cuda.is_available():
        # DeepSpeed's CPU shared-memory all-reduce segfaults in fp32 on CPUs without AVX-512.
        deepspeed.comm.comm.cdb.shm_vector_kernel_level = 0
    runner = ModelRunner.load(model, Path(model_dir), dtype=dtype, tp_size=tp_size, ep_size=ep_size)
    memory = _gather_memory(runner.weight_bytes, size)  # before the KV cache is allocated
    # Every rank has mapped every other's all-reduce segment by now: drop this rank's name so
    # the segment goes when the group does, however it ends (DeepSpeed never unlinks it).
    _unlink_allreduce_segment(where.master_addr, where.master_port, rank)
    runner.attach_decoder(slots=max_batch)
    served = 0
    if rank == 0:
        rank0 = _Rank0(
            runner, tp_size, max_batch, max_wait_ms / 1000, memory, replica, ep_size=ep_size
        )
        served = rank0.serve(Registry(Path(registry_dir)))
    else:
        while True:
            msg = _recv_broadcast(None)
            if msg["op"] == "shutdown":
                break
            try:
                _execute(runner, msg)
            except Exception:  # rank 0 reports the error; keep the ranks in step
                log.debug("rank %d: %s failed", rank, msg["op"], exc_info=True)
            served += 1
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return {"rank": rank, "served": served}


#: Where DeepSpeed's CPU shared-memory all-reduce keeps each rank's segment (``shm.cpp``).
SHM_DIR = Path("/dev/shm")


def allreduce_segment(master_addr: str, master_port: int, rank: int) -> Path:
    """The name of a rank's DeepSpeed CPU all-reduce segment (69 MB per rank)."""
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"


def _unlink_allreduce_segment(master_addr: str, master_port: int, rank: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        allreduce_segment(master_addr, master_port, rank).unlink()


def _gather_memory(weight_bytes: int, size: int) -> list[dict[str, Any]]:
    """Every rank's pid, peak resident memory and checkpoint bytes read, after loading
    (``size``: the group's ranks)."""
    import resource

    import torch

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    mine = torch.tensor(
        [peak_mb, weight_bytes / 2**20, _rss_mb(), os.getpid()],
        dtype=torch.float64,
        device=rank_device(),
    )
    every = [mine]
    if size > 1:
        import torch.distributed as dist

        every = [torch.zeros_like(mine) for _ in range(size)]
        dist.all_gather(every, mine)
    return [
        {
            "rank": r,
            "pid": int(t[3]),
            "peak_rss_mb": round(float(t[0]), 1),
            "rss_mb": round(float(t[2]), 1),
            "weights_mb": round(float(t[1]), 2),
        }
        for r, t in enumerate(every)
    ]


def _rss_mb() -> float:
    """Resident memory of this process now (MiB), from ``/proc/self/statm``."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Rank0:
    """Rank 0: the ZeroMQ socket, the generation scheduler, and the broadcast to the ranks.

    The loop drains the socket (without blocking while sequences run), then runs one
    scheduler step. ``embed`` runs whole, between two decode steps.
    """

    def __init__(
        self,
        runner: Any,
        tp_size: int,
        max_batch: int,
        max_wait_s: float,
        memory: list[dict[str, Any]],
        replica: str = "",
        *,
        ep_size: int = 1,
    ) -> None:
        from tpm_faas.runtime.scheduler import Scheduler

        self.runner = runner
        self.tp_size = tp_size
        self.ep_size = ep_size
        #: The group's ranks, which every model call is broadcast to.
        self.size = max(tp_size, ep_size)
        self.max_wait_s = max_wait_s
        self.scheduler = Scheduler(
            self._collective,
            slots=runner.decoder.slots,
            max_len=runner.decoder.max_len,
            max_batch=max_batch,
            tokenizer=runner.tok,
        )
        self.served = 0
        self.memory = memory  # every rank's, gathered after loading
        self.replica = replica

    def _collective(self, msg: dict[str, Any]) -> Any:
        """Run ``msg`` on every rank (broadcast first); return rank 0's result."""
        if self.size > 1:
            _recv_broadcast(msg)
        return _execute(self.runner, msg)

    def serve(self, registry: Registry) -> int:
        import zmq

        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        info = self.runner.info
        entry = GroupEntry(
            model=info,
            address=self.address,
            tp_size=self.tp_size,
            ep_size=self.ep_size,
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=time.time(),
            versions=runtime_versions(),
            replica=self.replica,
            heartbeat_at=time.time(),
        )
        registry.register(entry)
        next_beat = time.monotonic() + HEARTBEAT_S
        log.info(
            "serving %s at %s (tp=%d, ep=%d)", info.name, self.address, self.tp_size, self.ep_size
        )
        try:
            while True:
                if self._drain(sock):
                    break
                for ident, reply in self._step():
                    self.served += 1
                    sock.send_multipart([ident, b"", _dumps(reply)])
                if time.monotonic() >= next_beat:  # the heartbeat: a fresh registry entry
                    entry = dataclasses.replace(entry, heartbeat_at=time.time())
                    registry.register(entry)
                    next_beat = time.monotonic() + HEARTBEAT_S
        finally:
            registry.unregister(info.name, address=self.address, replica=self.replica)
            sock.close()
        return self.served

    def _step(self) -> list[tuple[Any, dict[str, Any]]]:
        """One scheduler step; a bug in it fails the requests in flight, not the group."""
        if not self.scheduler.busy:
            return []
        try:
            return self.scheduler.step()
        except Exception as e:
            from tpm_faas.runtime.scheduler import as_tpm_error

            log.exception("scheduler step failed")
            return self.scheduler.abort(as_tpm_error(e).message)

    def _wait_ms(self) -> int:
        """How long to block on the socket before the next step."""
        sched = self.scheduler
        if not sched.busy:
            return int(HEARTBEAT_S * 1000)  # idle: sleep until a request (or a heartbeat)
        if sched.running == 0 and sched.oldest_wait_s < self.max_wait_s:
            return max(1, round(1000 * (self.max_wait_s - sched.oldest_wait_s)))
        return 0

    def _drain(self, sock: Any) -> bool:
        """Take every message waiting on the socket; ``True`` when told to shut down."""
        import zmq
        from pydantic import ValidationError

        from tpm_faas.modes import by_shard_op
        from tpm_faas.protocol.shard import ShardMessage, parse_body

        while sock.poll(self._wait_ms(), zmq.POLLIN):
            frames = sock.recv_multipart()
            ident = frames[0]
            try:
                parsed = ShardMessage.model_validate_json(frames[-1])
            except ValidationError as e:
                err = RequestError(f"unreadable shard message: {e.errors()[0]['msg']}")
                sock.send_multipart([ident, b"", _dumps({"ok": False, "error": err.to_record()})])
                continue
            msg, op = parsed.model_dump(), parsed.op
            if op == "shutdown":
                for key, reply in self.scheduler.abort("the shard group is shutting down"):
                    sock.send_multipart([key, b"", _dumps(reply)])
                if self.size > 1:
                    _recv_broadcast(msg)
                result = {"served": self.served}
                sock.send_multipart([ident, b"", _dumps({"ok": True, "result": result})])
                return True
            mode = by_shard_op(op)
            if mode is not None and mode.scheduled:
                try:
                    body = parse_body(mode.shard_body, parsed.body)
                except TPMError as e:
                    reply = {"ok": False, "error": e.to_record(parsed.request_id)}
                    sock.send_multipart([ident, b"", _dumps(reply)])
                    continue
                self.scheduler.submit(ident, parsed.request_id, body)
                continue
            reply = self._answer(op, msg)
            sock.send_multipart([ident, b"", _dumps(reply)])
        return False

    def _answer(self, op: Any, msg: dict[str, Any]) -> dict[str, Any]:
        if op in ("ping", "info"):
            result = {
                "model": self.runner.info.name,
                "tp_size": self.tp_size,
                "ep_size": self.ep_size,
                "size": self.size,
                "served": self.served,
                "address": self.address,
                "running": self.scheduler.running,
                "max_batch": self.scheduler.max_batch,
                "memory": self.memory,
            }
            return {"ok": True, "result": result}
        if _whole_mode(op) is None:
            return {"ok": False, "error": RequestError(f"unknown shard op {op!r}").to_record()}
        self.served += 1
        try:
            return {"ok": True, "result": self._collective(msg)}
        except TPMError as e:
            return {"ok": False, "error": e.to_record(msg.get("request_id"))}
        except Exception as e:  # the group keeps serving; the caller gets a clear error
            from tpm_faas.runtime.scheduler import as_tpm_error

            log.exception("request %s failed", msg.get("request_id"))
            return {"ok": False, "error": as_tpm_error(e).to_record(msg.get("request_id"))}


def _execute(runner: Any, msg: dict[str, Any]) -> Any:
    op = msg["op"]
    if op in PLANS:
        return runner.run_plan(msg)
    mode = _whole_mode(op)
    if mode is None:
        raise RequestError(f"unknown shard op {op!r}")
    result: dict[str, Any] = getattr(runner, op)(msg.get("body") or {})
    return result


def _whole_mode(op: str) -> Any:
    """The mode whose op runs whole on every rank (not through the scheduler), or ``None``."""
    from tpm_faas.modes import by_shard_op

    mode = by_shard_op(op)
    return mode if mode is not None and not mode.scheduled else None


def _recv_broadcast(msg: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0 sends ``msg``; the other ranks receive it. JSON bytes, never pickles."""
    import torch
    import torch.distributed as dist

    if msg is not None:
        data = torch.frombuffer(bytearray(_dumps(msg)), dtype=torch.uint8).to(rank_device())
        size = torch.tensor([data.numel()], dtype=torch.int64, device=rank_device())
        dist.broadcast(size, src=0)
        dist.broadcast(data, src=0)
        return msg
    size = torch.zeros(1, dtype=torch.int64, device=rank_device())
    dist.broadcast(size, src=0)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=rank_device())
    dist.broadcast(data, src=0)
    out: dict[str, Any] = json.loads(data.cpu().numpy().tobytes())
    return out


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def runtime_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "deepspeed", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out
