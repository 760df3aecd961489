"""One rank of a shard group: load the model, stay warm, serve until told to stop.

Rank 0 owns a ZeroMQ ROUTER socket on loopback and registers its address. For each request
it broadcasts the message (JSON bytes in a uint8 tensor: no pickles cross ranks) to the
other ranks; all ranks run it; rank 0 replies. ``ping`` and ``info`` are answered by rank 0
alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import socket
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tpm_faas.errors import RequestError, TPMError
from tpm_faas.registry import GroupEntry, Registry

log = logging.getLogger(__name__)

RANK_OPS = ("generate", "embed", "intervene")


def serve_rank(
    rank: int,
    tp_size: int,
    master_port: int,
    model: str,
    model_dir: str,
    registry_dir: str,
    dtype: str = "float32",
    threads: int | None = None,
) -> dict[str, Any]:
    """Run rank ``rank`` of a group of ``tp_size``; returns a summary when the group stops."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(tp_size),
            "LOCAL_SIZE": str(tp_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port),
        }
    )
    from tpm_faas.runtime.prebuild import use_prebuilt_ops

    use_prebuilt_ops()
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // tp_size))
    import deepspeed
    import deepspeed.comm

    from tpm_faas.runtime.runner import ModelRunner

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    if dtype == "float32" and not torch.cuda.is_available():
        # DeepSpeed's CPU shared-memory all-reduce segfaults in fp32 on CPUs without AVX-512.
        deepspeed.comm.comm.cdb.shm_vector_kernel_level = 0
    runner = ModelRunner.load(model, Path(model_dir), dtype=dtype, tp_size=tp_size)
    served = 0
    if rank == 0:
        served = _serve_rank0(runner, tp_size, Registry(Path(registry_dir)))
    else:
        while True:
            msg = _recv_broadcast(None)
            if msg["op"] == "shutdown":
                break
            try:
                _execute(runner, msg)
            except Exception:  # rank 0 reports the error; keep the ranks in step
                log.debug("rank %d: request failed", rank, exc_info=True)
            served += 1
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return {"rank": rank, "served": served}


def _serve_rank0(runner: Any, tp_size: int, registry: Registry) -> int:
    import zmq

    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    entry = GroupEntry(
        model=runner.info,
        address=address,
        tp_size=tp_size,
        pid=os.getpid(),
        host=socket.gethostname(),
        started_at=time.time(),
        versions=runtime_versions(),
    )
    registry.register(entry)
    log.info("serving %s at %s (tp=%d)", runner.info.name, address, tp_size)
    served = 0
    try:
        while True:
            frames = sock.recv_multipart()
            ident, body = frames[0], frames[-1]
            try:
                msg = json.loads(body)
                op = msg.get("op")
            except ValueError:
                msg, op = {}, None
            if op == "shutdown":
                if tp_size > 1:
                    _recv_broadcast(msg)
                sock.send_multipart(
                    [ident, b"", _dumps({"ok": True, "result": {"served": served}})]
                )
                break
            if op in ("ping", "info"):
                reply = {
                    "ok": True,
                    "result": {
                        "model": runner.info.name,
                        "tp_size": tp_size,
                        "served": served,
                        "address": address,
                    },
                }
            elif op in RANK_OPS:
                if tp_size > 1:
                    _recv_broadcast(msg)
                try:
                    reply = {"ok": True, "result": _execute(runner, msg)}
                except TPMError as e:
                    reply = {"ok": False, "error": e.to_record(msg.get("request_id"))}
                except Exception as e:  # the group keeps serving; the caller gets a clear error
                    log.exception("request %s failed", msg.get("request_id"))
                    err = TPMError(f"the shard group failed the request: {type(e).__name__}: {e}")
                    reply = {"ok": False, "error": err.to_record(msg.get("request_id"))}
                served += 1
            else:
                reply = {"ok": False, "error": RequestError(f"unknown shard op {op!r}").to_record()}
            sock.send_multipart([ident, b"", _dumps(reply)])
    finally:
        registry.unregister(runner.info.name, address=address)
        sock.close()
    return served


def _execute(runner: Any, msg: dict[str, Any]) -> dict[str, Any]:
    op = msg["op"]
    body = msg.get("body") or {}
    result: dict[str, Any] = getattr(runner, op)(body)
    return result


def _recv_broadcast(msg: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0 sends ``msg``; the other ranks receive it. JSON bytes, never pickles."""
    import torch
    import torch.distributed as dist

    if msg is not None:
        data = torch.frombuffer(bytearray(_dumps(msg)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        dist.broadcast(size, src=0)
        dist.broadcast(data, src=0)
        return msg
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    out: dict[str, Any] = json.loads(data.numpy().tobytes())
    return out


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def runtime_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "deepspeed", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out
