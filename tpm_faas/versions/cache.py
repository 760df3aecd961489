"""Serving from the version store: find a model version's directory, materialising it from the
store into a size-bounded local cache when the model roots do not have it.

The cache is itself a model root: ``<cache>/<name>/<version>/`` is a plain Hugging Face
directory rebuilt by :func:`tpm_faas.versions.store.export` (every tensor and file checked
against the hashes recorded at commit) plus :data:`MARKER`, which names the manifest it was
rebuilt from. A version is rebuilt into a temporary directory and renamed into place, so a
reader sees a whole verified version or none; concurrent launchers serialise on a lock file
beside the cache. Least recently used versions (by the marker's modification time, touched
on every use) are evicted to keep the cache under its bound; a version a shard group is
starting on or serving is never evicted (the process that located it holds a lease until
:func:`release`; the gateway also reads its tokenizer there).

``NAME@latest`` means the store's newest version of ``NAME`` (the shard group then serves,
and receipts name, that concrete version).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tpm_faas.catalog import LATEST, MARKER, resolve, split_ref
from tpm_faas.config import Settings
from tpm_faas.errors import ConfigError, UnknownModel

_LOCK = ".lock"


@dataclass(frozen=True)
class Cached:
    """One materialised version in the cache."""

    ref: str
    path: Path
    size: int
    used_at: float


def latest(name: str, store: Path | None) -> str:
    """``NAME@VERSION`` of the store's newest version of ``name``."""
    from tpm_faas.versions.store import log

    entries = log(store, name) if store is not None else []
    if not entries:
        where = f"the version store {store}" if store is not None else "no version store"
        raise UnknownModel(f"{name}@{LATEST}: {name} has no committed version in {where}")
    return f"{name}@{entries[-1].version}"


def locate(model: str, settings: Settings, *, protect: Collection[str] = ()) -> Path:
    """The directory to serve ``model`` (``NAME@VERSION`` or ``NAME@latest``) from: the model
    roots' copy, else the version store's, materialised into the cache (verified).

    :param protect: versions the cache must not evict to make room (those live groups serve)
    :raises UnknownModel: in neither place
    :raises VersionError: the store's copy is corrupt (the object named); nothing is served
    """
    name, version = split_ref(model)
    store = settings.version_store
    if version == LATEST:
        model = latest(name, store)
    try:
        return resolve(model, settings.model_roots)
    except UnknownModel:
        if store is None or not _in_store(store, model):
            raise
    return materialise(
        store,
        model,
        settings.version_cache_dir,
        max_bytes=settings.version_cache_bytes,
        protect=protect,
    )


def concrete(model: str, settings: Settings) -> str:
    """``model`` with ``@latest`` replaced by the store's newest version."""
    name, version = split_ref(model)
    return latest(name, settings.version_store) if version == LATEST else model


def _in_store(store: Path, model: str) -> bool:
    name, version = split_ref(model)
    return (store / name / version / "manifest.json").is_file()


def materialise(
    store: Path,
    model: str,
    cache: Path,
    *,
    max_bytes: int,
    protect: Collection[str] = (),
) -> Path:
    """``model`` rebuilt from ``store`` into ``cache`` (once; later calls reuse it), leased to
    this process until :func:`release` (a leased version is never evicted).

    :raises ConfigError: the version alone is larger than the cache's bound, or only versions
        in use could be evicted to make room
    :raises VersionError: a missing or corrupted object (named); nothing is left in the cache
    """
    from tpm_faas.versions import store as vstore

    name, version = split_ref(model)
    final = cache / name / version
    man = vstore.load(store, model)
    if _matches(final, man.manifest_sha256) and _lease(final, man.manifest_sha256):
        return final  # already there: no need to wait for another version's rebuild
    with _locked(cache):
        _sweep(cache)
        if _matches(final, man.manifest_sha256):
            _lease(final, man.manifest_sha256)
            return final
        if final.exists():  # rebuilt from another manifest (another store)
            if _in_use(final):
                raise ConfigError(
                    f"{final} holds another {model} (another manifest) and a shard group uses "
                    "it; stop that group first"
                )
            _remove(final)
        need = man.full_bytes
        if need > max_bytes:
            raise ConfigError(
                f"{model} needs {need / 1e9:.2f} GB; the version cache's bound is "
                f"{max_bytes / 1e9:.2f} GB (TPM_FAAS_VERSION_CACHE_GB)"
            )
        _evict(cache, need, max_bytes, {model, *protect})
        tmp = cache / f".tmp-{uuid.uuid4().hex[:12]}"
        try:
            # Versions already in the cache are bases a delta can start from (the daily
            # update: yesterday's version is there, so only today's deltas are decoded).
            known = {c.ref: c.path for c in entries(cache) if c.ref != model}
            vstore.export(store, model, tmp, known=known)
            marker = {
                "ref": model,
                "manifest_sha256": man.manifest_sha256,
                "created": man.data["created"],
                "store": str(store),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _lease(final, man.manifest_sha256)
    return final


def entries(cache: Path) -> list[Cached]:
    """The versions in ``cache``, least recently used first (sizes count every file)."""
    out = []
    for marker in cache.glob(f"*/*/{MARKER}"):
        d = marker.parent
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        out.append(Cached(f"{d.parent.name}@{d.name}", d, size, marker.stat().st_mtime))
    return sorted(out, key=lambda c: c.used_at)


def _evict(cache: Path, need: int, max_bytes: int, keep: set[str]) -> None:
    present = entries(cache)
    used = sum(c.size for c in present)
    busy = []
    for c in present:
        if used + need <= max_bytes:
            return
        if c.ref in keep or not _remove_unused(c.path):
            busy.append(c.ref)
            continue
        used -= c.size
    if used + need > max_bytes:
        raise ConfigError(
            f"the version cache cannot make room for {need / 1e9:.2f} GB under its bound of "
            f"{max_bytes / 1e9:.2f} GB: the rest is held by versions in use "
            f"({', '.join(sorted(busy)) or 'none'})"
        )


# --- leases: a version a shard group is starting on or serving is never evicted -----------
#
# A process that located a version holds a shared flock on ``<cache>/<name>/.<version>.lease``
# until :func:`release` (or its exit); eviction takes the exclusive lock without waiting and
# skips the version when it cannot. flock locks of two open files conflict even within one
# process, so a process's own leases count as in use too.

_LEASES: dict[Path, IO[str]] = {}
_LEASES_LOCK = threading.Lock()


def _lease_path(d: Path) -> Path:
    return d.parent / f".{d.name}.lease"


def _lease(d: Path, manifest_sha256: str) -> bool:
    """Lease ``d`` to this process; ``False`` if it no longer holds that manifest (evicted
    or replaced before the lease was taken)."""
    with _LEASES_LOCK:
        if d in _LEASES:
            return True
        f = _lease_path(d).open("a")
        fcntl.flock(f, fcntl.LOCK_SH)
        if not _matches(d, manifest_sha256):
            f.close()
            return False
        _LEASES[d] = f
        _touch(d)
        return True


def release(d: Path) -> None:
    """Give up this process's lease on a cached version (its group stopped)."""
    with _LEASES_LOCK:
        f = _LEASES.pop(d, None)
    if f is not None:
        f.close()


def release_all() -> None:
    """Give up every lease this process holds (its groups all stopped)."""
    for d in list(_LEASES):
        release(d)


def _in_use(d: Path) -> bool:
    if d in _LEASES:
        return True
    lease = _lease_path(d)
    if not lease.exists():
        return False
    with lease.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _remove_unused(d: Path) -> bool:
    """Remove ``d`` unless a lease holds it (checked and removed under its exclusive lock)."""
    if d in _LEASES:
        return False
    with _lease_path(d).open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            _remove(d)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return True


def _sweep(cache: Path) -> None:
    """Remove what a rebuild or an eviction killed midway left (under the cache's lock, so
    nothing there is in progress)."""
    for left in [*cache.glob(".tmp-*"), *cache.glob("*/.gone-*")]:
        shutil.rmtree(left, ignore_errors=True)


def _matches(d: Path, manifest_sha256: str) -> bool:
    try:
        marker = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("manifest_sha256") == manifest_sha256


def _touch(d: Path) -> None:
    now = time.time()
    os.utime(d / MARKER, (now, now))


def _remove(d: Path) -> None:
    """Rename first (a reader never sees half a version), then delete."""
    trash = d.parent / f".gone-{d.name}-{uuid.uuid4().hex[:8]}"
    os.replace(d, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / _LOCK).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


__all__ = [
    "LATEST",
    "Cached",
    "concrete",
    "entries",
    "latest",
    "locate",
    "materialise",
    "release",
    "release_all",
]
