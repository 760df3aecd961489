"""Large results go by reference: a safetensors file in the results directory, with its sha256.

Globus Compute returns at most 10 MB per task. When the tensors of a result add up to more
than the inline limit (4 MB by default), every tensor payload of the result is written to one
``<request id>.safetensors`` file, replaced in the result by its dtype, shape and key, and the
result gains a ``tensors_ref`` naming the file, its size and its sha256. The client loads the
file transparently (``tpm_faas.client``), after checking the hash.

The file records its owner. A later ``intervene`` request of the same caller may name one of
its tensors (:class:`~tpm_faas.protocol.requests.ResultTensor`: request id, key, sha256) instead of
sending the values again; the gateway reads it here (:func:`resolve`) before admission.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tpm_faas.errors import LimitExceeded, TensorError, UnknownResult
from tpm_faas.protocol import codec
from tpm_faas.protocol.codec import MAX_TENSOR_BYTES
from tpm_faas.protocol.requests import ResultTensor, TensorPayload

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._:-]")
#: A results file's JSON header is small (one entry per saved tensor); refuse anything huge.
_MAX_HEADER = 16 * 1024 * 1024
#: :func:`prune` never deletes results younger than this.
PRUNE_FLOOR_S = 600.0
#: At most this many earlier results may be read for one request (each is hashed whole).
MAX_RESULT_FILES = 4


def payloads(obj: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every tensor payload in a JSON-able result, with its dotted path (in document order)."""
    if isinstance(obj, dict):
        if codec.is_payload(obj):
            return [(path, obj)]
        out = []
        for k, v in obj.items():
            out += payloads(v, f"{path}.{k}" if path else str(k))
        return out
    if isinstance(obj, list):
        out = []
        for i, v in enumerate(obj):
            out += payloads(v, f"{path}.{i}" if path else str(i))
        return out
    return []


def offload(
    output: dict[str, Any], request_id: str, results_dir: Path, limit: int, *, owner: str = ""
) -> int:
    """Move ``output``'s tensors to a file when they exceed ``limit`` bytes (in place).

    ``owner`` (the caller's identity) is recorded in the file's metadata: only its owner may
    use the file's tensors in a later request (see :func:`read_tensors`). Returns the bytes
    written (0 when everything stays inline).
    """
    found = payloads(output)
    inline = sum(codec.raw_size(p) for _, p in found)
    if inline <= limit:
        return 0
    from safetensors.numpy import save

    arrays = {}
    for key, p in found:
        if p["dtype"] != "float32":
            raise ValueError(f"result tensor {key} has dtype {p['dtype']}; expected float32")
        arrays[key] = codec.decode_array(p)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = file_name(request_id)
    path = results_dir / name
    data = save(arrays, metadata={"request_id": request_id, "owner": owner})
    # Created 0600 (mkstemp): only its writer may ever read it. On a multi-user endpoint that
    # is the caller's mapped local account, and the results directory is shared.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=results_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest = hashlib.sha256(data).hexdigest()
    for key, p in found:
        del p["data"]
        p["key"] = key
    size = path.stat().st_size
    output["tensors_ref"] = {
        "name": name,
        "uri": path.resolve().as_uri(),
        "sha256": digest,
        "bytes": size,
        "format": "safetensors",
    }
    return size


def file_name(request_id: str) -> str:
    """The results file of ``request_id`` (a file name, never a path)."""
    return _SAFE_NAME.sub("_", request_id) + ".safetensors"


def read_tensors(
    results_dir: Path,
    result: str,
    sha256: str,
    keys: list[str],
    identities: frozenset[str],
    max_bytes: int,
) -> dict[str, TensorPayload]:
    """Tensors ``keys`` of an earlier by-reference result, for a later request of its owner.

    The file is opened once (no symlinks, regular files only) and read in one pass from that
    descriptor, hashing every byte and keeping the wanted ranges, so the values returned are
    exactly the bytes that hash to ``sha256``. Before that pass: the header is parsed as JSON
    (never unpickled), the owner recorded at :func:`offload` must be one of ``identities``,
    and each tensor's declared size is checked against the file and, together, against
    ``max_bytes``.

    :raises UnknownResult: no such result here, not the caller's, or a file whose owner cannot
        be read (the same answer for all three)
    :raises TensorError: no such key, a tensor that is not float32 or not inside its file, a
        hash mismatch
    :raises LimitExceeded: tensors larger than ``max_bytes`` together
    """
    missing = UnknownResult(
        f"tensors: no result {result!r} of yours in this site's results directory "
        "(only results that came back by reference, on the site that served them)"
    )
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # a FIFO must not block the worker
    try:
        fd = os.open(results_dir / file_name(result), flags)
    except OSError:
        raise missing from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise missing
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        try:
            header, data_start = _header(f, st.st_size)
        except (OSError, ValueError, RecursionError):
            raise missing from None  # whose it is cannot be read: as good as not there
        meta = header.pop("__metadata__", None)
        owner = meta.get("owner") if isinstance(meta, dict) else None
        if not isinstance(owner, str) or not owner or owner not in identities:
            raise missing
        spans: dict[str, tuple[list[int], int, int]] = {}
        for key in keys:
            entry = header.get(key)
            if not isinstance(entry, dict):
                names = sorted(k for k, v in header.items() if isinstance(v, dict))
                shown = ", ".join(names[:8]) + (
                    f" and {len(names) - 8} more" if len(names) > 8 else ""
                )
                raise TensorError(f"tensors: result {result!r} has no tensor {key!r} ({shown})")
            spans[key] = _entry(entry, key, result, data_start, st.st_size)
        for key, (_, _, n) in spans.items():
            if n > MAX_TENSOR_BYTES:
                raise LimitExceeded(
                    f"tensors: {key!r} of result {result!r} is {n} bytes; no tensor may be over "
                    f"{MAX_TENSOR_BYTES}"
                )
        total = sum(n for _, _, n in spans.values())
        if total > max_bytes:
            raise LimitExceeded(
                f"tensors: {', '.join(map(repr, spans))} of result {result!r} come to {total} "
                f"bytes; the limit left for this request's tensors is {max_bytes}"
            )
        bufs = {key: bytearray(n) for key, (_, _, n) in spans.items()}
        digest = hashlib.sha256()
        pos = 0
        try:
            f.seek(0)
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                end = pos + len(block)
                for key, (_, start, n) in spans.items():
                    lo, hi = max(start, pos), min(start + n, end)
                    if lo < hi:
                        bufs[key][lo - start : hi - start] = block[lo - pos : hi - pos]
                pos = end
        except OSError as e:
            raise TensorError(f"tensors: result {result!r} could not be read: {e}") from None
    if digest.hexdigest() != sha256:
        raise TensorError(
            f"tensors: result {result!r} has sha256 {digest.hexdigest()}, not the {sha256} "
            "you asked for"
        )
    if pos != st.st_size:
        raise TensorError(f"tensors: result {result!r} changed while it was read")
    return {
        key: TensorPayload.from_bytes(bytes(bufs[key]), "float32", shape)
        for key, (shape, _, _) in spans.items()
    }


def resolve(
    tensors: dict[str, TensorPayload | ResultTensor],
    results_dir: Path,
    identities: frozenset[str],
    max_bytes: int,
) -> dict[str, TensorPayload]:
    """``tensors`` with every :class:`ResultTensor` replaced by its values.

    References to the same file are read in one pass; at most :data:`MAX_RESULT_FILES`
    files per request. Together the read tensors may not exceed ``max_bytes`` (the policy's
    input-bytes limit).
    """
    files: dict[tuple[str, str], list[str]] = {}
    for t in tensors.values():
        if isinstance(t, ResultTensor):
            wanted = files.setdefault((t.result, t.sha256), [])
            if t.key not in wanted:
                wanted.append(t.key)
    if len(files) > MAX_RESULT_FILES:
        raise LimitExceeded(
            f"tensors: the request names {len(files)} earlier results; at most "
            f"{MAX_RESULT_FILES} may be read for one request"
        )
    read: dict[tuple[str, str, str], TensorPayload] = {}
    left = max_bytes
    for (result, sha256), keys in files.items():
        got = read_tensors(results_dir, result, sha256, keys, identities, left)
        left -= sum(t.nbytes for t in got.values())
        read.update({(result, sha256, k): t for k, t in got.items()})
    return {
        name: read[(t.result, t.sha256, t.key)] if isinstance(t, ResultTensor) else t
        for name, t in tensors.items()
    }


def prune(results_dir: Path, older_than_s: float, *, now: float, dry_run: bool = False) -> Pruned:
    """Delete results files (and unfinished temporary files) last written more than
    ``older_than_s`` seconds before ``now``. Results are kept only for their owners to fetch
    and to reuse by reference; a site prunes them on a schedule (``tpm-faas results prune``).
    Files are matched by name; nothing else in the directory is touched.

    :raises ValueError: ``older_than_s`` under :data:`PRUNE_FLOOR_S` (a result that young may
        still be being written, or read by a request that names it)
    """
    if not older_than_s >= PRUNE_FLOOR_S:
        raise ValueError(
            f"results younger than {PRUNE_FLOOR_S / 60:.0f} minutes are never pruned (they may "
            "still be being written or read)"
        )
    pruned = Pruned()
    if not results_dir.is_dir():
        return pruned
    for path in sorted(results_dir.iterdir()):
        name = path.name
        ours = name.endswith(".safetensors") or (  # or an unfinished one (see offload)
            name.startswith(".") and ".safetensors." in name and name.endswith(".tmp")
        )
        try:
            st = path.lstat()
        except FileNotFoundError:  # removed meanwhile
            continue
        if not ours or not stat.S_ISREG(st.st_mode):
            continue
        if now - st.st_mtime <= older_than_s:
            pruned.kept += 1
            continue
        if not dry_run:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except PermissionError:  # another account's, in a sticky directory
                pruned.skipped += 1
                continue
        pruned.files += 1
        pruned.bytes += st.st_size
    return pruned


@dataclass
class Pruned:
    """What :func:`prune` removed (or would remove) and kept."""

    files: int = 0
    bytes: int = 0
    kept: int = 0
    #: Old files this process may not delete (run it as root or the directory's owner).
    skipped: int = 0


def _header(f: BinaryIO, size: int) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data starts.

    :raises ValueError: not a safetensors header
    """
    head = f.read(8)
    if len(head) != 8:
        raise ValueError("shorter than a header")
    n = int.from_bytes(head, "little")
    if n > min(size - 8, _MAX_HEADER):
        raise ValueError(f"header of {n} bytes")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + n


def _entry(
    entry: dict[str, Any], key: str, result: str, data_start: int, size: int
) -> tuple[list[int], int, int]:
    """Shape, absolute start and length of a header entry, checked against the file."""
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    ok = (
        entry.get("dtype") == "F32"
        and isinstance(shape, list)
        and 1 <= len(shape) <= 4
        and all(type(d) is int and 1 <= d <= 1 << 24 for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int and o >= 0 for o in offsets)
    )
    if not ok:
        raise TensorError(f"tensors: {key!r} of result {result!r} is not a float32 tensor")
    assert isinstance(shape, list) and isinstance(offsets, list)
    nbytes = math.prod(shape) * 4
    start = data_start + offsets[0]
    if offsets[1] - offsets[0] != nbytes or start + nbytes > size:
        raise TensorError(f"tensors: {key!r} of result {result!r} does not fit its file")
    return shape, start, nbytes
