"""Serving from the version store: find a model version's directory, materialising it from the
store into a size-bounded local cache when the model roots do not have it.

The cache is itself a model root: ``<cache>/<name>/<version>/`` is a plain Hugging Face
directory rebuilt by :func:`tpm_faas.versions.store.export` (every tensor and file checked
against the hashes recorded at commit) plus :data:`MARKER`, which names the manifest it was
rebuilt from. A version is rebuilt into a temporary directory and renamed into place, so a
reader sees a whole verified version or none; concurrent launchers serialise on a lock file
beside the cache. Least recently used versions (by the marker's modification time, touched
on every use) are evicted to keep the cache under its bound; a version a live shard group
serves (the ``protect`` set) is never evicted: the gateway reads its tokenizer there.

``NAME@latest`` means the store's newest version of ``NAME`` (the shard group then serves,
and receipts name, that concrete version).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
    """``model`` rebuilt from ``store`` into ``cache`` (once; later calls reuse it).

    :raises ConfigError: the version alone is larger than the cache's bound, or only versions
        in ``protect`` could be evicted to make room
    :raises VersionError: a missing or corrupted object (named); nothing is left in the cache
    """
    from tpm_faas.versions import store as vstore

    name, version = split_ref(model)
    final = cache / name / version
    man = vstore.load(store, model)
    with _locked(cache):
        if _matches(final, man.manifest_sha256):
            _touch(final)
            return final
        if final.exists():  # rebuilt from another manifest (another store): rebuild
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
    return final


def entries(cache: Path) -> list[Cached]:
    """The versions in ``cache``, least recently used first."""
    out = []
    for marker in cache.glob(f"*/*/{MARKER}"):
        d = marker.parent
        size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
        out.append(Cached(f"{d.parent.name}@{d.name}", d, size, marker.stat().st_mtime))
    return sorted(out, key=lambda c: c.used_at)


def _evict(cache: Path, need: int, max_bytes: int, keep: set[str]) -> None:
    present = entries(cache)
    used = sum(c.size for c in present)
    for c in present:
        if used + need <= max_bytes:
            return
        if c.ref not in keep:
            _remove(c.path)
            used -= c.size
    if used + need > max_bytes:
        kept = ", ".join(sorted(c.ref for c in present if c.ref in keep)) or "none"
        raise ConfigError(
            f"the version cache cannot make room for {need / 1e9:.2f} GB under its bound of "
            f"{max_bytes / 1e9:.2f} GB: the rest is held by versions in use ({kept})"
        )


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


__all__ = ["LATEST", "Cached", "concrete", "entries", "latest", "locate", "materialise"]
