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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from tpm_faas.errors import ConfigError, VersionError
from tpm_faas.runtime.model_store import _ST_DTYPES, read_header
from tpm_faas.versions import codec

#: Manifest format version.
FORMAT: Final = 1
#: A keyframe at least every this many versions unless told otherwise.
DEFAULT_KEYFRAME_EVERY: Final = 8
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_OBJECTS: Final = "objects"


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

    @property
    def share(self) -> float:
        """Bytes stored as a share of a full copy."""
        return self.stored_bytes / self.full_bytes if self.full_bytes else 0.0


# --- objects -------------------------------------------------------------------------------


def _object_path(store: Path, sha: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise VersionError(f"malformed object name {sha!r}")
    return store / _OBJECTS / sha[:2] / sha


def _write(path: Path, data: bytes, *, replace: bool = True, sync: bool = False) -> bool:
    """Write ``data`` to ``path`` whole or not at all (a temporary file beside it, mode 0644,
    then renamed; with ``replace`` false, hard-linked, so an existing ``path`` is kept and
    ``False`` returned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
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
    return Manifest(data, hashlib.sha256(raw).hexdigest())


def _write_manifest(store: Path, ref: str, data: dict[str, Any]) -> Manifest:
    raw = _canonical(data)
    if not _write(_manifest_path(store, ref), raw, replace=False, sync=True):
        raise VersionError(f"{ref} already exists; a version is never replaced")
    return Manifest(data, hashlib.sha256(raw).hexdigest())


# --- tensors -------------------------------------------------------------------------------


class _Decoder:
    """Reconstructs tensors, following delta bases through older manifests (memoised)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.words: dict[str, bytes] = {}
        self.manifests: dict[str, Manifest] = {}

    def manifest(self, ref: str) -> Manifest:
        if ref not in self.manifests:
            self.manifests[ref] = load(self.store, ref)
        return self.manifests[ref]

    def tensor(self, entry: dict[str, Any]) -> bytes:
        """The exact bytes of the tensor ``entry`` describes, checked against its sha256."""
        sha = str(entry["sha256"])
        if sha in self.words:
            return self.words[sha]
        name = str(entry["name"])
        payload = _get(self.store, str(entry["object"]), f"tensor {name!r}")
        record = entry.get("encoding")
        if record is None:
            data = payload
        else:
            enc = codec.Encoded.from_json(record, payload)
            parent = None
            if enc.encoding in codec.DELTA_ENCODINGS:
                base = entry.get("base")
                if base is None:
                    raise VersionError(f"tensor {name!r}: a delta without a base version")
                pentry = self.manifest(str(base)).tensors().get(name)
                if pentry is None:
                    raise VersionError(f"tensor {name!r}: its base {base} has no such tensor")
                pword = codec.DTYPES[enc.dtype].word
                parent = np.frombuffer(self.tensor(pentry), dtype=pword).reshape(enc.shape)
            data = codec.decode(enc, parent).tobytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise VersionError(f"tensor {name!r}: sha256 mismatch of the reconstructed bytes")
        self.words[sha] = data
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
    parse_ref(ref)
    if _manifest_path(root, ref).exists():
        raise VersionError(f"{ref} already exists; a version is never replaced")
    if not src.is_dir():
        raise VersionError(f"{src} is not a directory")
    decoder = _Decoder(root)
    pman = decoder.manifest(parent) if parent is not None else None
    ptensors = pman.tensors() if pman is not None else {}
    stored = full = 0
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
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
                    pwords = np.frombuffer(decoder.tensor(p), dtype=word).reshape(shape)
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
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "keyframe_every": keyframe_every,
        "stored_bytes": stored,
        "full_bytes": full,
        "files": files,
    }
    return _write_manifest(root, ref, record)


# --- export, verify, log -------------------------------------------------------------------


def _rebuild(decoder: _Decoder, rel: str, f: dict[str, Any]) -> bytes:
    if f["kind"] == "blob":
        data = _get(decoder.store, str(f["object"]), f"file {rel!r}")
    else:
        parts = [_get(decoder.store, str(f["header"]), f"header of {rel!r}")]
        parts += [decoder.tensor(t) for t in f["tensors"]]
        data = b"".join(parts)
    got = hashlib.sha256(data).hexdigest()
    if got != f["sha256"] or len(data) != int(f["size"]):
        raise VersionError(f"file {rel!r}: sha256 mismatch of the rebuilt file ({got})")
    return data


def _check_parent(decoder: _Decoder, man: Manifest) -> None:
    if man.parent is not None:
        pm = decoder.manifest(man.parent)
        if pm.manifest_sha256 != man.data.get("parent_manifest_sha256"):
            raise VersionError(
                f"{man.ref}: its parent {man.parent}'s manifest is not the one it was committed on"
            )


def export(store: str | os.PathLike[str], ref: str, dest_dir: str | os.PathLike[str]) -> Manifest:
    """Rebuild ``ref`` as a plain Hugging Face directory ``dest_dir`` (new or empty), every
    file checked against the sha256 recorded at commit.

    :raises VersionError: a missing or corrupted object, or a file that does not rebuild
        exactly (named); nothing unchecked is left in ``dest_dir``
    """
    decoder = _Decoder(Path(store))
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
        _write(target, _rebuild(decoder, rel, f))
    return man


def verify(store: str | os.PathLike[str], ref: str) -> list[str]:
    """Reconstruct every tensor and file of ``ref`` and check every hash.

    :returns: the problems found (each names the object, tensor or file); empty when fine
    """
    decoder = _Decoder(Path(store))
    try:
        man = decoder.manifest(ref)
        _check_parent(decoder, man)
    except VersionError as e:
        return [str(e)]
    problems = []
    for rel, f in man.files.items():
        try:
            _rebuild(decoder, rel, f)
        except VersionError as e:
            problems.append(f"{rel}: {e}")
    return problems


def log(store: str | os.PathLike[str], name: str) -> list[LogEntry]:
    """The versions of ``name``, oldest first, with what each cost to store."""
    parse_ref(f"{name}@0")
    d = Path(store) / name
    out = []
    for m in sorted(d.glob("*/manifest.json")) if d.is_dir() else []:
        man = load(store, f"{name}@{m.parent.name}")
        out.append(
            LogEntry(
                version=str(man.data["version"]),
                parent=man.parent,
                created=str(man.data["created"]),
                stored_bytes=man.stored_bytes,
                full_bytes=man.full_bytes,
                manifest_sha256=man.manifest_sha256,
            )
        )
    return sorted(out, key=lambda e: (e.created, e.version))


__all__ = [
    "DEFAULT_KEYFRAME_EVERY",
    "LogEntry",
    "Manifest",
    "commit",
    "export",
    "load",
    "log",
    "parse_ref",
    "verify",
]
