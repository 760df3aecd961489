"""A content-addressed store of model versions on a local directory (issue 15).

Layout::

    <store>/objects/<sha256[:2]>/<sha256>     immutable payloads, named by their own sha256
    <store>/<name>/<version>/manifest.json    one version: every file, every tensor

:func:`commit` reads a Hugging Face checkpoint directory with plain file I/O. Every file that
is not a safetensors file (config, tokenizer, card...) is one object, stored whole. A
safetensors file is its header bytes (one object, so export rebuilds it byte for byte) and its
tensors in offset order; each tensor is stored with :func:`tpm_faas.versions.codec.best`, as a
delta against the parent version's tensor of the same name when it has the same dtype and
shape and the chain since the last keyframe is shorter than ``keyframe_every``. A tensor whose
sha256 equals the parent's costs no payload: the manifest reuses the parent's object and
record. Dtypes the codec does not handle (integers, bool, float64) are stored raw.

Every read checks: an object must hash to its name, every decoded tensor and every rebuilt
file to the sha256 recorded at commit. :func:`export` and :func:`verify` name the object or
file that disagrees and never hand back corrupt bytes. A manifest's own sha256 (of the
canonical JSON it is written as) is the version's identity (:attr:`Manifest.manifest_sha256`).
:func:`export` and :func:`verify` decode a file's tensors on a pool of threads (zstd, numpy
and sha256 release the GIL) and consume them in offset order, so the output is the same
bytes whatever the pool's size, and at most a few tensors per thread are held at once.

:func:`diff` compares two versions tensor by tensor (share of words changed, largest absolute
difference); :func:`gc` removes versions no one needs and the objects only they referenced.

**Concurrency.** ``<store>/.lock`` is taken with ``flock``: shared by :func:`commit` (from
before it reads the parent until its manifest is written), :func:`export`, :func:`verify`
and :func:`diff`; exclusive by :func:`gc`. So gc never runs while a commit has written
objects that no manifest references yet, nor while a version is being read; commits and
reads run side by side. A reader that cannot open the lock file (a read-only store) reads
without it. gc removes manifests before objects, each version directory atomically (renamed
to ``.trash-*`` first, then deleted), so a crash leaves at worst unreferenced objects or a
trash directory, both removed by the next gc, and never a manifest naming a missing object.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import numpy as np
import numpy.typing as npt

from tpm_faas.catalog import LATEST, MARKER
from tpm_faas.errors import ConfigError, VersionError
from tpm_faas.runtime.model_store import _ST_DTYPES, read_header
from tpm_faas.versions import codec

#: Manifest format version.
FORMAT: Final = 1
#: A keyframe at least every this many versions unless told otherwise.
DEFAULT_KEYFRAME_EVERY: Final = 8
#: Threads that decode tensors unless told otherwise: ``min(8, os.cpu_count())``.
MAX_DEFAULT_WORKERS: Final = 8
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_OBJECTS: Final = "objects"
_LOCK: Final = ".lock"
_TRASH: Final = ".trash-"
_REMOVED: Final = ".removed-"
_T = TypeVar("_T")
_R = TypeVar("_R")


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME@VERSION`` as ``(name, version)``; both plain path components."""
    name, sep, version = ref.partition("@")
    if not sep or not _PART.match(name) or not _PART.match(version) or name == _OBJECTS:
        raise VersionError(
            f"{ref!r} is not NAME@VERSION (letters, digits, '.', '_', '-'; not 'objects')"
        )
    return name, version


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Manifest:
    """One committed version: its JSON (``data``) and the sha256 of that JSON's bytes."""

    data: dict[str, Any]
    manifest_sha256: str

    @property
    def ref(self) -> str:
        return f"{self.data['name']}@{self.data['version']}"

    @property
    def parent(self) -> str | None:
        p = self.data.get("parent")
        return None if p is None else str(p)

    @property
    def stored_bytes(self) -> int:
        return int(self.data["stored_bytes"])

    @property
    def full_bytes(self) -> int:
        return int(self.data["full_bytes"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = self.data["files"]
        return files

    def tensors(self) -> dict[str, dict[str, Any]]:
        """Every tensor entry of every safetensors file, by tensor name."""
        return {
            t["name"]: t
            for f in self.files.values()
            if f["kind"] == "safetensors"
            for t in f["tensors"]
        }


@dataclass(frozen=True)
class LogEntry:
    """One line of :func:`log`."""

    version: str
    parent: str | None
    created: str
    stored_bytes: int
    full_bytes: int
    manifest_sha256: str
    #: The longest reconstruction chain of its tensors (0: a keyframe, nothing to follow).
    chain: int = 0

    @property
    def share(self) -> float:
        """Bytes stored as a share of a full copy."""
        return self.stored_bytes / self.full_bytes if self.full_bytes else 0.0


# --- objects -------------------------------------------------------------------------------


def _object_path(store: Path, sha: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise VersionError(f"malformed object name {sha!r}")
    return store / _OBJECTS / sha[:2] / sha


def _write(
    path: Path,
    data: bytes | Callable[[IO[bytes]], None],
    *,
    replace: bool = True,
    sync: bool = False,
) -> bool:
    """Write ``data`` to ``path`` whole or not at all (a temporary file beside it, mode 0644,
    then renamed; with ``replace`` false, hard-linked, so an existing ``path`` is kept and
    ``False`` returned). ``data`` may be a function that writes the file's bytes itself (and
    raises to leave nothing behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # atomic, and never replaces what is there
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def _put(store: Path, data: bytes) -> tuple[str, int]:
    """Store ``data``; its sha256 and the bytes newly written (0 when already present)."""
    sha = hashlib.sha256(data).hexdigest()
    path = _object_path(store, sha)
    if path.exists():
        return sha, 0
    _write(path, data)
    return sha, len(data)


def _get(store: Path, sha: str, what: str) -> bytes:
    """The object's bytes, refused unless they hash to its name."""
    path = _object_path(store, sha)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VersionError(f"object {sha} ({what}) is missing") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise VersionError(f"object {sha} ({what}) is corrupted: its bytes hash to {got}")
    return data


@contextmanager
def _locked(store: Path, *, exclusive: bool = False, create: bool = False) -> Iterator[None]:
    """Hold ``<store>/.lock``: shared (commit, export, verify, diff) or exclusive (gc).

    :param create: make the store directory first (a commit into a new store)
    :raises VersionError: an exclusive lock that cannot be taken (a read-only store); a
        shared one is skipped when the lock file neither exists nor can be made (a read-only
        store no commit or gc of this code ever locked)
    """
    if create:
        store.mkdir(parents=True, exist_ok=True)
    path = store / _LOCK
    fd: int | None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if exclusive:
            raise VersionError(f"cannot take the version store's lock {path}: {e.strerror}") from e
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _workers(workers: int | None) -> int:
    if workers is None:
        return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)
    if workers < 1:
        raise VersionError("workers must be at least 1")
    return workers


def _in_order(fn: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R]:
    """``fn`` of each item, computed on ``workers`` threads and yielded in the items' order,
    with at most ``2 * workers`` computed ahead (so memory stays bounded). An error stops the
    rest; it is raised when its item's turn comes."""
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="tpm-versions") as pool:
        pending: deque[Future[_R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


# --- manifests -----------------------------------------------------------------------------


def _manifest_path(store: Path, ref: str) -> Path:
    name, version = parse_ref(ref)
    return store / name / version / "manifest.json"


def load(store: str | os.PathLike[str], ref: str) -> Manifest:
    """The manifest of ``ref``. :raises VersionError: no such version, or unreadable."""
    path = _manifest_path(Path(store), ref)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise VersionError(f"no version {ref} in the store") from None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise VersionError(f"the manifest of {ref} is not JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise VersionError(f"the manifest of {ref} is not a format-{FORMAT} manifest")
    if (data.get("name"), data.get("version")) != parse_ref(ref):
        raise VersionError(f"the manifest at {ref} names another version")
    return Manifest(data, hashlib.sha256(raw).hexdigest())


def _write_manifest(store: Path, ref: str, data: dict[str, Any]) -> Manifest:
    raw = _canonical(data)
    if not _write(_manifest_path(store, ref), raw, replace=False, sync=True):
        raise VersionError(f"{ref} already exists; a version is never replaced")
    return Manifest(data, hashlib.sha256(raw).hexdigest())


# --- tensors -------------------------------------------------------------------------------


class _Decoder:
    """Reconstructs tensors, following delta bases through older manifests (memoised; the
    tensors themselves are not, so memory holds only those in flight). Thread-safe."""

    def __init__(self, store: Path, known: Mapping[str, Path] | None = None) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._manifests: dict[str, Manifest] = {}
        self._tensors: dict[str, dict[str, dict[str, Any]]] = {}
        #: Plain directories of versions already rebuilt (a delta on one of them reads its
        #: base there instead of decoding the base's chain), and their tensors' places.
        self._known = dict(known or {})
        self._places: dict[str, dict[str, tuple[Path, int, int]]] = {}

    def _delta(self, enc: codec.Encoded, entry: dict[str, Any], name: str) -> codec.Words:
        """A delta-encoded tensor decoded on its base: the base's bytes in a version already
        rebuilt if there are any (unchecked here: decode checks the parent's sha256, and a
        file changed since is passed over), else the base reconstructed from the store."""
        base = entry.get("base")
        if base is None:
            raise VersionError(f"tensor {name!r}: a delta without a base version")
        pentry = self.tensors(str(base)).get(name)
        if pentry is None:
            raise VersionError(f"tensor {name!r}: its base {base} has no such tensor")
        pword = codec.DTYPES[enc.dtype].word
        rebuilt = self._rebuilt(str(base), name, None)
        if rebuilt is not None and len(rebuilt) == int(pentry.get("size", -1)):
            with contextlib.suppress(VersionError):
                return codec.decode(enc, np.frombuffer(rebuilt, dtype=pword).reshape(enc.shape))
        parent = np.frombuffer(self.view(pentry), dtype=pword).reshape(enc.shape)
        return codec.decode(enc, parent)

    def _rebuilt(self, ref: str, name: str, sha: str | None) -> memoryview | None:
        """Tensor ``name`` of version ``ref`` read from its rebuilt directory, if the bytes
        there still hash to ``sha`` (``None``: not checked here); else ``None``."""
        d = self._known.get(ref)
        if d is None:
            return None
        with self._lock:
            places = self._places.get(ref)
        if places is None:
            places = {}
            try:
                for f in sorted(d.glob("*.safetensors")):
                    for k, e in read_header(f).items():
                        places[k] = (f, e.begin, e.end)
            except (OSError, ConfigError):
                places = {}
            with self._lock:
                places = self._places.setdefault(ref, places)
        where = places.get(name)
        if where is None:
            return None
        path, begin, end = where
        try:
            with path.open("rb") as fh:
                fh.seek(begin)
                data = fh.read(end - begin)
        except OSError:
            return None
        if len(data) != end - begin or (
            sha is not None and hashlib.sha256(data).hexdigest() != sha
        ):
            return None
        return memoryview(data)

    def manifest(self, ref: str) -> Manifest:
        with self._lock:
            man = self._manifests.get(ref)
        if man is None:
            man = load(self.store, ref)
            with self._lock:
                man = self._manifests.setdefault(ref, man)
        return man

    def tensors(self, ref: str) -> dict[str, dict[str, Any]]:
        """:meth:`Manifest.tensors` of ``ref``, built once."""
        with self._lock:
            table = self._tensors.get(ref)
        if table is None:
            table = self.manifest(ref).tensors()
            with self._lock:
                table = self._tensors.setdefault(ref, table)
        return table

    def view(self, entry: dict[str, Any]) -> memoryview:
        """The exact bytes of the tensor ``entry`` describes, checked against its sha256."""
        sha = str(entry["sha256"])
        name = str(entry["name"])
        for ref in list(self._known):  # the same tensor in a version already rebuilt
            try:
                have = self.tensors(ref).get(name)
            except VersionError:  # not a version of this store: not a base
                self._known.pop(ref, None)
                continue
            if have is not None and have["sha256"] == sha:
                rebuilt = self._rebuilt(ref, name, sha)
                if rebuilt is not None:
                    return rebuilt
        payload = _get(self.store, str(entry["object"]), f"tensor {name!r}")
        record = entry.get("encoding")
        if record is None:
            data = memoryview(payload)
            checked = False
        else:
            enc = codec.Encoded.from_json(record, payload)
            words = (
                self._delta(enc, entry, name)
                if enc.encoding in codec.DELTA_ENCODINGS
                else codec.decode(enc, None)
            )
            data = np.ascontiguousarray(words).reshape(-1).view(np.uint8).data
            checked = enc.sha256 == sha  # decode checked the words against this very hash
        if not checked and hashlib.sha256(data).hexdigest() != sha:
            raise VersionError(f"tensor {name!r}: sha256 mismatch of the reconstructed bytes")
        return data


def _safetensors_layout(path: Path) -> tuple[bytes, list[tuple[str, str, list[int], int, int]]]:
    """The header bytes (length prefix included) and the tensors in offset order, or
    ConfigError when the file is not one whose data region the tensors exactly tile."""
    entries = read_header(path)
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(0)
        header = f.read(8 + n)
    rev = {v: k for k, v in _ST_DTYPES.items()}
    tensors = sorted(
        ((k, rev[e.dtype], list(e.shape), e.begin, e.end) for k, e in entries.items()),
        key=lambda t: (t[3], t[4]),
    )
    pos = len(header)
    for _, _, _, start, end in tensors:
        if start != pos or end < start:
            raise ConfigError(f"{path}: tensors do not tile the data region")
        pos = end
    if pos != path.stat().st_size:
        raise ConfigError(f"{path}: bytes after the last tensor")
    return header, tensors


# --- commit --------------------------------------------------------------------------------


def commit(
    src_dir: str | os.PathLike[str],
    store: str | os.PathLike[str],
    ref: str,
    *,
    parent: str | None = None,
    keyframe_every: int = DEFAULT_KEYFRAME_EVERY,
) -> Manifest:
    """Store the checkpoint directory ``src_dir`` as ``ref`` (``NAME@VERSION``).

    :param parent: ``NAME@VERSION`` to encode against (tensors of the same name)
    :param keyframe_every: no reconstruction chain is longer than this many versions
    :raises VersionError: ``ref`` exists already, the parent is missing or corrupt
    """
    if keyframe_every < 1:
        raise VersionError("keyframe_every must be at least 1")
    src, root = Path(src_dir), Path(store)
    if parse_ref(ref)[1] == LATEST:
        raise VersionError(f"{ref}: '{LATEST}' names the newest version; commit a concrete one")
    if not src.is_dir():
        raise VersionError(f"{src} is not a directory")
    with _locked(root, create=True):  # gc waits until the manifest names every object
        return _commit(src, root, ref, parent, keyframe_every)


def _tombstone(root: Path, ref: str) -> Path:
    """Where gc records that it removed ``ref`` (a version name is never used twice)."""
    name, version = parse_ref(ref)
    return root / name / f"{_REMOVED}{version}"


def _commit(src: Path, root: Path, ref: str, parent: str | None, keyframe_every: int) -> Manifest:
    if _manifest_path(root, ref).exists():
        raise VersionError(f"{ref} already exists; a version is never replaced")
    if _tombstone(root, ref).exists():
        raise VersionError(
            f"{ref} was committed before and removed by gc; a version name is never reused "
            "(receipts may name it): commit under a new version"
        )
    decoder = _Decoder(root)
    pman = decoder.manifest(parent) if parent is not None else None
    ptensors = pman.tensors() if pman is not None else {}
    stored = full = 0
    files: dict[str, dict[str, Any]] = {}
    # The serving cache's marker says which manifest a directory was rebuilt from: it is not
    # part of any version (committing a rebuilt directory must not carry the old one's).
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.name != MARKER):
        rel = path.relative_to(src).as_posix()
        raw = path.read_bytes()
        full += len(raw)
        fsha = hashlib.sha256(raw).hexdigest()
        layout = None
        if path.suffix == ".safetensors":
            try:
                layout = _safetensors_layout(path)
            except (ConfigError, ValueError, KeyError, TypeError):
                layout = None  # stored whole: still bit-identical
        if layout is None:
            sha, new = _put(root, raw)
            stored += new
            files[rel] = {"kind": "blob", "sha256": fsha, "size": len(raw), "object": sha}
            continue
        header, table = layout
        hsha, new = _put(root, header)
        stored += new
        tensors = []
        for tname, st_dtype, shape, start, end in table:
            data = raw[start:end]
            tsha = hashlib.sha256(data).hexdigest()
            p = ptensors.get(tname)
            same = p is not None and p["dtype"] == st_dtype and list(p["shape"]) == shape
            if p is not None and same and p["sha256"] == tsha:
                tensors.append(dict(p))  # unchanged: the parent's object and record
                continue
            entry: dict[str, Any] = {
                "name": tname,
                "dtype": st_dtype,
                "shape": shape,
                "sha256": tsha,
                "size": len(data),
                "encoding": None,
                "base": None,
                "depth": 0,
            }
            cdtype = _ST_DTYPES[st_dtype]
            if cdtype in codec.DTYPES:
                word = codec.DTYPES[cdtype].word
                words = np.frombuffer(data, dtype=word).reshape(shape)
                pwords = None
                if p is not None and same and int(p["depth"]) + 1 < keyframe_every:
                    pwords = np.frombuffer(decoder.view(p), dtype=word).reshape(shape)
                enc = codec.best(words, pwords, cdtype, name=tname)
                payload = enc.payload
                entry["encoding"] = enc.to_json()
                if enc.encoding in codec.DELTA_ENCODINGS:
                    assert p is not None and parent is not None
                    entry["base"] = parent
                    entry["depth"] = int(p["depth"]) + 1
            else:
                payload = data
            entry["object"], new = _put(root, payload)
            stored += new
            tensors.append(entry)
        files[rel] = {
            "kind": "safetensors",
            "sha256": fsha,
            "size": len(raw),
            "header": hsha,
            "tensors": tensors,
        }
    name, version = parse_ref(ref)
    record: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "parent": parent,
        "parent_manifest_sha256": None if pman is None else pman.manifest_sha256,
        "created": datetime.now(UTC).isoformat(timespec="microseconds"),
        "keyframe_every": keyframe_every,
        "stored_bytes": stored,
        "full_bytes": full,
        "files": files,
    }
    return _write_manifest(root, ref, record)


# --- export, verify, log -------------------------------------------------------------------


def _stream(
    decoder: _Decoder, rel: str, f: dict[str, Any], workers: int, out: IO[bytes] | None
) -> None:
    """Rebuild the file ``rel`` into ``out`` (or only check it), tensors decoded on
    ``workers`` threads and written in offset order; the whole file's sha256 and size are
    checked at the end (a caller that writes discards what it wrote when this raises)."""
    h = hashlib.sha256()
    size = 0

    def emit(buf: bytes | memoryview) -> None:
        nonlocal size
        h.update(buf)
        size += len(buf)
        if out is not None:
            out.write(buf)

    if f["kind"] == "blob":
        emit(_get(decoder.store, str(f["object"]), f"file {rel!r}"))
    else:
        emit(_get(decoder.store, str(f["header"]), f"header of {rel!r}"))
        for buf in _in_order(decoder.view, f["tensors"], workers):
            emit(buf)
    got = h.hexdigest()
    if got != f["sha256"] or size != int(f["size"]):
        raise VersionError(f"file {rel!r}: sha256 mismatch of the rebuilt file ({got})")


def _check_parent(decoder: _Decoder, man: Manifest) -> None:
    if man.parent is None:
        return
    if not _manifest_path(decoder.store, man.parent).exists():
        return  # removed by gc, which keeps every base a tensor needs (a missing base is named)
    pm = decoder.manifest(man.parent)
    if pm.manifest_sha256 != man.data.get("parent_manifest_sha256"):
        raise VersionError(
            f"{man.ref}: its parent {man.parent}'s manifest is not the one it was committed on"
        )


def export(
    store: str | os.PathLike[str],
    ref: str,
    dest_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    known: Mapping[str, Path] | None = None,
) -> Manifest:
    """Rebuild ``ref`` as a plain Hugging Face directory ``dest_dir`` (new or empty), every
    file checked against the sha256 recorded at commit.

    :param workers: threads that decode tensors (default ``min(8, os.cpu_count())``); the
        bytes written are the same for any number
    :param known: directories where earlier versions were rebuilt (``NAME@VERSION`` → dir,
        e.g. the serving cache): a tensor stored as a delta on one of them reads its base
        there (checked against the base's sha256) instead of decoding the base's whole chain
    :raises VersionError: a missing or corrupted object, or a file that does not rebuild
        exactly (named); nothing unchecked is left in ``dest_dir``
    """
    n = _workers(workers)
    root = Path(store)
    with _locked(root):
        decoder = _Decoder(root, known)
        man = decoder.manifest(ref)
        _check_parent(decoder, man)
        dest = Path(dest_dir)
        if dest.exists() and any(dest.iterdir()):
            raise VersionError(f"{dest} is not empty")
        dest.mkdir(parents=True, exist_ok=True)
        for rel, f in man.files.items():
            target = dest / rel
            if not target.resolve().is_relative_to(dest.resolve()):
                raise VersionError(f"file {rel!r} lies outside the export directory")
            _write(target, functools.partial(_stream, decoder, rel, f, n))
    return man


def verify(store: str | os.PathLike[str], ref: str, *, workers: int | None = None) -> list[str]:
    """Reconstruct every tensor and file of ``ref`` and check every hash.

    :param workers: threads that decode tensors (default ``min(8, os.cpu_count())``)
    :returns: the problems found, one per file at most (each names the object, tensor or
        file); empty when fine
    """
    n = _workers(workers)
    root = Path(store)
    with _locked(root):
        decoder = _Decoder(root)
        try:
            man = decoder.manifest(ref)
            _check_parent(decoder, man)
        except VersionError as e:
            return [e.message]
        problems = []
        for rel, f in man.files.items():
            try:
                _stream(decoder, rel, f, n, None)
            except VersionError as e:
                problems.append(f"{rel}: {e.message}")
    return problems


def _chain(man: Manifest) -> int:
    return max((int(t.get("depth", 0)) for t in man.tensors().values()), default=0)


def log(store: str | os.PathLike[str], name: str) -> list[LogEntry]:
    """The versions of ``name``, oldest first, with what each cost to store."""
    parse_ref(f"{name}@0")
    d = Path(store) / name
    out = []
    for m in sorted(d.glob("*/manifest.json")) if d.is_dir() else []:
        if not _PART.match(m.parent.name):  # a version gc is removing (.trash-*)
            continue
        man = load(store, f"{name}@{m.parent.name}")
        out.append(
            LogEntry(
                version=str(man.data["version"]),
                parent=man.parent,
                created=str(man.data["created"]),
                stored_bytes=man.stored_bytes,
                full_bytes=man.full_bytes,
                manifest_sha256=man.manifest_sha256,
                chain=_chain(man),
            )
        )
    return sorted(out, key=lambda e: (e.created, _natural(e.version)))


def _natural(version: str) -> tuple[str | int, ...]:
    """``version``'s sort key: digit runs compare as numbers (``9`` before ``10``)."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", version)))


def _encoding_name(entry: dict[str, Any]) -> str:
    """The codec's encoding of a tensor entry, or ``plain`` (a dtype the codec does not
    handle, stored as its bytes)."""
    record = entry.get("encoding")
    return "plain" if record is None else str(record["encoding"])


def _stored_size(entry: dict[str, Any]) -> int:
    record = entry.get("encoding")
    return int(entry["size"]) if record is None else int(record["nbytes"])


@dataclass(frozen=True)
class VersionStats:
    """What one version holds and what it cost to store (``tpm-faas models commit``).

    :param changed: tensors new or different from the parent's (``None`` when the parent is
        no longer in the store); without a parent, every tensor
    :param encodings: how many of the changed tensors each encoding stores
    :param chain: the longest reconstruction chain (0: a keyframe)
    """

    ref: str
    parent: str | None
    tensors: int
    changed: int | None
    encodings: dict[str, int]
    chain: int
    stored_bytes: int
    full_bytes: int
    manifest_sha256: str

    @property
    def unchanged(self) -> int | None:
        return None if self.changed is None else self.tensors - self.changed

    @property
    def share(self) -> float:
        """Bytes stored as a share of a full copy."""
        return self.stored_bytes / self.full_bytes if self.full_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "parent": self.parent,
            "tensors": self.tensors,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "encodings": dict(self.encodings),
            "chain": self.chain,
            "stored_bytes": self.stored_bytes,
            "full_bytes": self.full_bytes,
            "share": self.share,
            "manifest_sha256": self.manifest_sha256,
        }


def stats(store: str | os.PathLike[str], ref: str) -> VersionStats:
    """:class:`VersionStats` of ``ref``, from its manifest and its parent's."""
    root = Path(store)
    man = load(root, ref)
    tensors = man.tensors()
    ptensors: dict[str, dict[str, Any]] | None = {}
    if man.parent is not None:
        try:
            ptensors = load(root, man.parent).tensors()
        except VersionError:
            ptensors = None
    if ptensors is None:
        new = list(tensors.values())
    else:
        new = [t for k, t in tensors.items() if ptensors.get(k, {}).get("sha256") != t["sha256"]]
    return VersionStats(
        ref=man.ref,
        parent=man.parent,
        tensors=len(tensors),
        changed=None if ptensors is None else len(new),
        encodings=dict(sorted(Counter(_encoding_name(t) for t in new).items())),
        chain=_chain(man),
        stored_bytes=man.stored_bytes,
        full_bytes=man.full_bytes,
        manifest_sha256=man.manifest_sha256,
    )


# --- diff ----------------------------------------------------------------------------------

#: Bytes per element of each safetensors dtype the store meets.
_ITEMSIZE: Final = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
#: The unsigned word of each element size, to compare bit patterns.
_WORD: Final[dict[int, np.dtype[Any]]] = {n: np.dtype(f"<u{n}") for n in (1, 2, 4, 8)}


@dataclass(frozen=True)
class TensorDiff:
    """One tensor of :func:`diff`: B's against A's.

    :param status: ``changed``, ``unchanged``, ``added`` (only in B) or ``removed`` (only in A)
    :param dtype: the safetensors dtype (B's; A's for a removed tensor)
    :param changed_share: the share of its words (elements' bit patterns) that differ; 1.0
        when added or when the dtype or shape changed
    :param max_abs_diff: the largest absolute difference of the values (NaN entries left
        out; NaN when every difference is one); ``None`` when not comparable
    :param encoding: how B stores it (the codec's encoding, or ``plain``); ``None`` if removed
    :param stored_bytes: the size of B's object for it
    """

    name: str
    file: str
    status: str
    dtype: str
    shape: tuple[int, ...]
    changed_share: float
    max_abs_diff: float | None
    encoding: str | None
    stored_bytes: int
    a_dtype: str | None = None
    a_shape: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        d = self.max_abs_diff
        return {
            "name": self.name,
            "file": self.file,
            "status": self.status,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "a_dtype": self.a_dtype,
            "a_shape": None if self.a_shape is None else list(self.a_shape),
            "changed_share": self.changed_share,
            # JSON has no NaN or infinity: those as strings
            "max_abs_diff": d if d is None or math.isfinite(d) else str(d),
            "encoding": self.encoding,
            "stored_bytes": self.stored_bytes,
        }


@dataclass(frozen=True)
class VersionDiff:
    """What :func:`diff` found between versions ``a`` and ``b``."""

    a: str
    b: str
    tensors: tuple[TensorDiff, ...]
    files_added: tuple[str, ...]
    files_removed: tuple[str, ...]
    files_changed: tuple[str, ...]

    @property
    def changed(self) -> tuple[TensorDiff, ...]:
        """The tensors that are not unchanged (added and removed included)."""
        return tuple(t for t in self.tensors if t.status != "unchanged")

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "tensors": len(self.tensors),
            "changed": [t.to_json() for t in self.changed],
            "unchanged": sum(t.status == "unchanged" for t in self.tensors),
            "files_added": list(self.files_added),
            "files_removed": list(self.files_removed),
            "files_changed": list(self.files_changed),
        }


@functools.lru_cache(maxsize=1)
def _e4m3fn_values() -> npt.NDArray[np.float64]:
    """The value of each float8_e4m3fn bit pattern (1 sign, 4 exponent bits with bias 7, 3
    mantissa bits; no infinities; S.1111.111 is NaN)."""
    v = np.arange(256)
    e, m = (v >> 3) & 0xF, (v & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * np.exp2(e - 7.0))
    mag[(v & 0x7F) == 0x7F] = np.nan
    out: npt.NDArray[np.float64] = np.where(v & 0x80, -mag, mag)
    return out


def _values(words: npt.NDArray[Any], dtype: str) -> npt.NDArray[np.float64] | None:
    """The words' values as float64 (numpy views, no torch); ``None`` for an unknown dtype."""
    w = np.ascontiguousarray(words)
    if dtype == "BF16":
        f: npt.NDArray[Any] = (w.astype(np.uint32) << np.uint32(16)).view(np.float32)
    elif dtype in ("F16", "F32", "F64"):
        f = w.view(f"<f{_ITEMSIZE[dtype]}")
    elif dtype == "F8_E4M3":
        f = _e4m3fn_values()[w]
    elif dtype in ("I64", "I32", "I16", "I8"):
        f = w.view(f"<i{_ITEMSIZE[dtype]}")
    elif dtype in ("U8", "BOOL"):
        f = w
    else:
        return None
    return f.astype(np.float64)


def _max_abs(a: npt.NDArray[Any], b: npt.NDArray[Any], dtype: str) -> float | None:
    fa, fb = _values(a, dtype), _values(b, dtype)
    if fa is None or fb is None:
        return None
    if fa.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(fa - fb)
    d = d[~np.isnan(d)]
    return float(d.max()) if d.size else math.nan


def _compare(
    decoder: _Decoder,
    name: str,
    a: tuple[str, dict[str, Any]] | None,
    b: tuple[str, dict[str, Any]] | None,
) -> TensorDiff:
    if b is None:
        assert a is not None
        rel, ea = a
        shape = tuple(int(s) for s in ea["shape"])
        return TensorDiff(
            name, rel, "removed", str(ea["dtype"]), shape, 1.0, None, None, 0,
            str(ea["dtype"]), shape,
        )  # fmt: skip
    rel, eb = b
    dtype, shape = str(eb["dtype"]), tuple(int(s) for s in eb["shape"])
    enc, stored = _encoding_name(eb), _stored_size(eb)
    if a is None:
        return TensorDiff(name, rel, "added", dtype, shape, 1.0, None, enc, stored)
    ea = a[1]
    a_dtype, a_shape = str(ea["dtype"]), tuple(int(s) for s in ea["shape"])
    if (a_dtype, a_shape) != (dtype, shape):
        return TensorDiff(
            name, rel, "changed", dtype, shape, 1.0, None, enc, stored, a_dtype, a_shape
        )
    if ea["sha256"] == eb["sha256"]:
        return TensorDiff(
            name, rel, "unchanged", dtype, shape, 0.0, 0.0, enc, stored, a_dtype, a_shape
        )
    word = _WORD.get(_ITEMSIZE.get(dtype, 1), _WORD[1])
    wa = np.frombuffer(decoder.view(ea), dtype=word)
    wb = np.frombuffer(decoder.view(eb), dtype=word)
    differs = wa != wb
    count = int(np.count_nonzero(differs))
    share = count / wa.size if wa.size else 0.0
    biggest = _max_abs(wa[differs], wb[differs], dtype)
    return TensorDiff(
        name, rel, "changed", dtype, shape, share, biggest, enc, stored, a_dtype, a_shape
    )


def _tensor_files(man: Manifest) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        t["name"]: (rel, t)
        for rel, f in man.files.items()
        if f["kind"] == "safetensors"
        for t in f["tensors"]
    }


def diff(
    store: str | os.PathLike[str], a_ref: str, b_ref: str, *, workers: int | None = None
) -> VersionDiff:
    """Compare version ``b_ref`` with ``a_ref`` (any two versions, of any names): every
    tensor (by name) changed or not and by how much, every file added, removed or changed.
    Changed tensors are decoded (and so verified) on ``workers`` threads.

    :raises VersionError: either version is missing, or an object it needs is missing or
        corrupted (named)
    """
    n = _workers(workers)
    root = Path(store)
    with _locked(root):
        decoder = _Decoder(root)
        ma, mb = decoder.manifest(a_ref), decoder.manifest(b_ref)
        ta, tb = _tensor_files(ma), _tensor_files(mb)
        names = list(tb) + [k for k in ta if k not in tb]
        tensors = tuple(_in_order(lambda k: _compare(decoder, k, ta.get(k), tb.get(k)), names, n))
    fa, fb = ma.files, mb.files
    return VersionDiff(
        a=ma.ref,
        b=mb.ref,
        tensors=tensors,
        files_added=tuple(sorted(set(fb) - set(fa))),
        files_removed=tuple(sorted(set(fa) - set(fb))),
        files_changed=tuple(
            sorted(k for k in set(fa) & set(fb) if fa[k]["sha256"] != fb[k]["sha256"])
        ),
    )


# --- gc ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GCReport:
    """What :func:`gc` removed (or, in a dry run, would remove) and what it kept, and why.

    :param kept: every version kept, with its reasons (``"; "``-joined)
    :param objects_freed: object files removed (leftover temporary files included)
    :param bytes_freed: their bytes
    """

    removed: tuple[str, ...]
    kept: dict[str, str]
    objects_freed: int
    bytes_freed: int
    dry_run: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "removed": list(self.removed),
            "kept": dict(self.kept),
            "objects_freed": self.objects_freed,
            "bytes_freed": self.bytes_freed,
        }


def _all_manifests(root: Path) -> dict[str, Manifest]:
    """Every version in the store; gc refuses to go on past one it cannot read."""
    out = {}
    for d in sorted(root.iterdir()):
        if d.name == _OBJECTS or not _PART.match(d.name) or not d.is_dir():
            continue
        for v in sorted(d.iterdir()):
            if _PART.match(v.name) and (v / "manifest.json").is_file():
                ref = f"{d.name}@{v.name}"
                try:
                    out[ref] = load(root, ref)
                except VersionError as e:
                    raise VersionError(
                        f"gc stops: {e.message}, and a manifest it cannot read may name any object"
                    ) from e
    return out


def _objects_of(man: Manifest) -> set[str]:
    out = set()
    for f in man.files.values():
        if f["kind"] == "blob":
            out.add(str(f["object"]))
        else:
            out.add(str(f["header"]))
            out.update(str(t["object"]) for t in f["tensors"])
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_version(root: Path, ref: str) -> None:
    """Remove a version's directory: renamed away first (atomic, and made durable), then
    deleted, so a crash never leaves half a manifest directory under a version's name."""
    name, version = parse_ref(ref)
    # The name stays taken: a receipt naming it must never meet other weights under it.
    sha = load(root, ref).manifest_sha256
    _write(_tombstone(root, ref), f"removed by gc; its manifest was {sha}\n".encode())
    trash = root / name / f"{_TRASH}{version}-{uuid.uuid4().hex[:8]}"
    os.rename(root / name / version, trash)
    _fsync_dir(root / name)
    shutil.rmtree(trash)


def gc(
    store: str | os.PathLike[str],
    *,
    keep: Mapping[str, str] | None = None,
    keep_last: int = 1,
    dry_run: bool = False,
) -> GCReport:
    """Remove the versions no one needs, then the objects no remaining version references.

    A version is kept when it is in ``keep``, among the newest ``keep_last`` of its name (by
    commit time), or the delta base of a tensor of a kept version (and so on, up to the
    keyframe). Runs under the store's exclusive lock (see the module's docstring): no commit
    or read is in progress meanwhile. Manifests go first, objects after; leftovers of an
    earlier gc or commit that crashed (``.trash-*`` directories, temporary files) go too.

    :param keep: ``NAME@VERSION`` to keep, with the reason (``"charged in the ledger"``);
        refs not in the store are ignored
    :param keep_last: keep this many newest versions of every name (0: none for that reason)
    :param dry_run: change nothing; report what would be removed and freed
    :raises VersionError: no store there, or a manifest that cannot be read
    """
    if keep_last < 0:
        raise VersionError("keep_last cannot be negative")
    root = Path(store)
    if not root.is_dir():
        raise VersionError(f"no version store at {root}")
    with _locked(root, exclusive=True):
        mans = _all_manifests(root)
        reasons = _reasons_to_keep(mans, keep or {}, keep_last)
        removed = tuple(sorted(r for r in mans if r not in reasons))
        live = set().union(*(_objects_of(mans[r]) for r in reasons))
        sweep = [
            path
            for path in _object_files(root)
            if path.name.startswith(".tmp-") or path.name not in live
        ]
        freed = sum(p.stat().st_size for p in sweep)
        if not dry_run:
            for ref in removed:
                _remove_version(root, ref)
            for path in sweep:  # no manifest names them any more
                path.unlink(missing_ok=True)
            _tidy(root)
        return GCReport(
            removed=removed,
            kept={r: "; ".join(reasons[r]) for r in sorted(reasons)},
            objects_freed=len(sweep),
            bytes_freed=freed,
            dry_run=dry_run,
        )


def _reasons_to_keep(
    mans: dict[str, Manifest], keep: Mapping[str, str], keep_last: int
) -> dict[str, list[str]]:
    """Every version gc keeps, with why: asked to, among the newest, or a base of a kept one."""
    reasons: dict[str, list[str]] = {}
    for ref, why in keep.items():
        if ref in mans:
            reasons.setdefault(ref, []).append(why)
    lineages: dict[str, list[Manifest]] = {}
    for man in mans.values():
        lineages.setdefault(str(man.data["name"]), []).append(man)
    for name, lineage in sorted(lineages.items()):
        lineage.sort(key=lambda m: (str(m.data["created"]), _natural(str(m.data["version"]))))
        why = f"newest of {name}" if keep_last == 1 else f"one of the newest {keep_last} of {name}"
        for man in lineage[-keep_last:] if keep_last else []:
            reasons.setdefault(man.ref, []).append(why)
    todo = deque(sorted(reasons))
    while todo:  # the delta bases of kept versions, and theirs, up to the keyframes
        ref = todo.popleft()
        bases = {str(t["base"]) for t in mans[ref].tensors().values() if t.get("base")}
        for base in sorted(bases):
            if base in mans and base not in reasons:
                reasons[base] = [f"base of {ref}"]
                todo.append(base)
    return reasons


def _object_files(root: Path) -> Iterator[Path]:
    """Every object file of the store, and the temporary files of writes that never ended."""
    objects = root / _OBJECTS
    for sub in sorted(objects.iterdir()) if objects.is_dir() else []:
        for path in sorted(sub.iterdir()) if sub.is_dir() else []:
            if path.name.startswith(".tmp-") or re.fullmatch(r"[0-9a-f]{64}", path.name):
                yield path


def _tidy(root: Path) -> None:
    """Remove what a crashed gc left (``.trash-*``) and names without versions."""
    for d in root.iterdir():
        if d.name == _OBJECTS or not _PART.match(d.name) or not d.is_dir():
            continue
        for trash in d.glob(f"{_TRASH}*"):
            shutil.rmtree(trash, ignore_errors=True)
        if not any(d.iterdir()):
            d.rmdir()


__all__ = [
    "DEFAULT_KEYFRAME_EVERY",
    "MAX_DEFAULT_WORKERS",
    "GCReport",
    "LogEntry",
    "Manifest",
    "TensorDiff",
    "VersionDiff",
    "VersionStats",
    "commit",
    "diff",
    "export",
    "gc",
    "load",
    "log",
    "parse_ref",
    "stats",
    "verify",
]
