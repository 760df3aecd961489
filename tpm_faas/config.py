"""Settings of one tpm_faas installation, read from the environment in one place.

Precedence: an explicit argument to :meth:`Settings.from_env` > a ``TPM_FAAS_*`` environment
variable > the default below. Nothing here is read at import time.

- ``TPM_FAAS_HOME``: state directory (registry, ledger, results); ``~/.tpm_faas``
- ``TPM_FAAS_POLICY``: the site policy YAML; a bare name of a bundled policy (``byo.yaml``,
  ``local-dev.yaml``, ``provider-site.yaml``) that is not a file in the working directory means
  the one shipped in the package (:data:`POLICIES`); the bundled ``local-dev.yaml``
- ``TPM_FAAS_AUTH``: ``local`` (dev tokens file) or ``globus``; ``local``
- ``TPM_FAAS_DEV_TOKENS``: dev tokens file for ``local`` auth; ``$TPM_FAAS_HOME/dev-tokens.yaml``
- ``TPM_FAAS_CLIENT_ID``: the TPM resource server's Globus Auth client id; ``local-dev``
- ``TPM_FAAS_CLIENT_SECRET``: its secret (``globus`` auth only)
- ``TPM_FAAS_MAPPED_IDENTITY``: the identity the endpoint mapped this worker to; unset (no check)
- ``TPM_FAAS_GLOBUS_GROUPS``: ``1`` to look up callers' Globus groups (policies matching on
  ``globus_groups``, ``globus`` auth only); unset
- ``TPM_FAAS_LEDGER``: SQLAlchemy URL of the SU ledger; ``sqlite:///$TPM_FAAS_HOME/ledger.sqlite``
- ``TPM_FAAS_MODELS``: ``:``-separated model roots (``tpm-faas models add`` imports into the
  first); ``$TPM_FAAS_HOME/models`` then the models bundled with the package
- ``TPM_FAAS_SHARD_TIMEOUT``: seconds to wait for a shard group's answer; ``300``
- ``TPM_FAAS_INLINE_LIMIT``: tensors of a result larger than this many bytes in all go to a
  safetensors file in ``$TPM_FAAS_HOME/results`` and are returned by reference; ``4000000``
  (Globus Compute allows 10 MB per result)
- ``TPM_FAAS_VERSION_STORE``: the site's version store (``tpm-faas models commit``); a model
  version not in the model roots is served from it; unset (none)
- ``TPM_FAAS_VERSION_CACHE``: where store versions are materialised for serving;
  ``$TPM_FAAS_HOME/cache``
- ``TPM_FAAS_VERSION_CACHE_GB``: the cache's size bound (least recently used versions are
  evicted, never one a live shard group serves); ``500``
- ``TPM_FAAS_SITE``: the site's name in receipts; the host name
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path


def package_data(*parts: str) -> Path:
    """A file or directory shipped in the package under ``tpm_faas/data/``.

    Found through :mod:`importlib.resources`, so it is the installed wheel's copy (or the
    source tree's, in an editable install). The package must be installed as files (not
    zipped): ranks, endpoints and Parsl workers are handed these paths.
    """
    res = files("tpm_faas").joinpath("data", *parts)
    if not isinstance(res, Path):  # a zipped install: nothing to hand to another process
        raise RuntimeError(f"tpm_faas is not installed as files; cannot locate data {res}")
    return res


#: The version cache's size bound unless the site sets one (``TPM_FAAS_VERSION_CACHE_GB``).
DEFAULT_VERSION_CACHE_BYTES = 500 * 10**9


def _path_or_none(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _gigabytes(value: str | None, default: int) -> int:
    if not value:
        return default
    try:
        gb = float(value)
    except ValueError:
        gb = -1.0
    if not 0 < gb < float("inf"):
        from tpm_faas.errors import ConfigError

        raise ConfigError(f"TPM_FAAS_VERSION_CACHE_GB={value!r} is not a positive, finite number")
    return int(gb * 10**9)


PACKAGE_DIR = Path(__file__).resolve().parent
#: The models shipped with the package (``demo-tpm@1``).
BUNDLED_MODELS = package_data("models")
#: The default site policies and their JSON Schema.
POLICIES = package_data("policies")
#: The Globus Compute endpoint templates.
ENDPOINT_TEMPLATES = package_data("endpoint_templates")


def resolve_policy(value: str | os.PathLike[str]) -> Path:
    """The policy file ``value`` names: a path, or the bare name of a bundled policy.

    A bare name (``byo.yaml``) that is not a file in the working directory is looked up in
    :data:`POLICIES`, so an endpoint template can default to a bundled policy wherever the
    package is installed.
    """
    path = Path(value)
    if path.parent == Path(".") and not path.exists() and (POLICIES / path.name).is_file():
        return POLICIES / path.name
    return path


@dataclass(frozen=True)
class Settings:
    """Where state lives and which site services to use."""

    home: Path
    policy_path: Path
    auth_backend: str = "local"
    dev_tokens_path: Path | None = None
    client_id: str = "local-dev"
    client_secret: str | None = None
    mapped_identity: str | None = None
    globus_groups: bool = False
    ledger_url: str = ""
    model_roots: tuple[Path, ...] = (BUNDLED_MODELS,)
    shard_timeout_s: float = 300.0
    inline_limit_bytes: int = 4_000_000
    #: The site's version store (:mod:`tpm_faas.versions.store`); ``None``: none.
    version_store: Path | None = None
    #: Where versions from the store are materialised for serving, and its size bound.
    version_cache: Path | None = None
    version_cache_bytes: int = DEFAULT_VERSION_CACHE_BYTES
    #: This site's name, as receipts record it.
    site: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def registry_dir(self) -> Path:
        """Where shard groups register their addresses."""
        return self.home / "registry"

    @property
    def results_dir(self) -> Path:
        return self.home / "results"

    @property
    def version_cache_dir(self) -> Path:
        """Where versions from the store are materialised (default ``$TPM_FAAS_HOME/cache``)."""
        return self.version_cache or self.home / "cache"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``env`` (default ``os.environ``) and keyword overrides."""
        e = os.environ if env is None else env
        # A home given as an override is the one the other defaults derive from.
        given = overrides.get("home")
        home = Path(
            str(given) if given is not None else e.get("TPM_FAAS_HOME") or Path.home() / ".tpm_faas"
        ).expanduser()
        roots = e.get("TPM_FAAS_MODELS")
        values: dict[str, object] = {
            "home": home,
            "policy_path": resolve_policy(e.get("TPM_FAAS_POLICY") or POLICIES / "local-dev.yaml"),
            "auth_backend": e.get("TPM_FAAS_AUTH", "local"),
            "dev_tokens_path": Path(e.get("TPM_FAAS_DEV_TOKENS") or home / "dev-tokens.yaml"),
            "client_id": e.get("TPM_FAAS_CLIENT_ID", "local-dev"),
            "client_secret": e.get("TPM_FAAS_CLIENT_SECRET"),
            "mapped_identity": e.get("TPM_FAAS_MAPPED_IDENTITY") or None,
            "globus_groups": e.get("TPM_FAAS_GLOBUS_GROUPS", "") in ("1", "true", "yes"),
            "ledger_url": e.get("TPM_FAAS_LEDGER") or f"sqlite:///{home / 'ledger.sqlite'}",
            "model_roots": tuple(Path(p) for p in roots.split(":") if p)
            if roots
            else (home / "models", BUNDLED_MODELS),
            "shard_timeout_s": float(e.get("TPM_FAAS_SHARD_TIMEOUT", "300")),
            "inline_limit_bytes": int(e.get("TPM_FAAS_INLINE_LIMIT", "4000000")),
            "version_store": _path_or_none(e.get("TPM_FAAS_VERSION_STORE")),
            "version_cache": _path_or_none(e.get("TPM_FAAS_VERSION_CACHE")),
            "version_cache_bytes": _gigabytes(
                e.get("TPM_FAAS_VERSION_CACHE_GB"), DEFAULT_VERSION_CACHE_BYTES
            ),
            "site": e.get("TPM_FAAS_SITE") or socket.gethostname(),
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in another process."""
        env = {
            "TPM_FAAS_HOME": str(self.home),
            "TPM_FAAS_POLICY": str(self.policy_path),
            "TPM_FAAS_AUTH": self.auth_backend,
            "TPM_FAAS_CLIENT_ID": self.client_id,
            "TPM_FAAS_LEDGER": self.ledger_url,
            "TPM_FAAS_MODELS": ":".join(str(p) for p in self.model_roots),
            "TPM_FAAS_SHARD_TIMEOUT": str(self.shard_timeout_s),
            "TPM_FAAS_INLINE_LIMIT": str(self.inline_limit_bytes),
        }
        if self.version_store is not None:
            env["TPM_FAAS_VERSION_STORE"] = str(self.version_store)
        if self.version_cache is not None:
            env["TPM_FAAS_VERSION_CACHE"] = str(self.version_cache)
        env["TPM_FAAS_VERSION_CACHE_GB"] = repr(self.version_cache_bytes / 1e9)
        if self.site:
            env["TPM_FAAS_SITE"] = self.site
        if self.dev_tokens_path is not None:
            env["TPM_FAAS_DEV_TOKENS"] = str(self.dev_tokens_path)
        if self.mapped_identity:
            env["TPM_FAAS_MAPPED_IDENTITY"] = self.mapped_identity
        if self.globus_groups:
            env["TPM_FAAS_GLOBUS_GROUPS"] = "1"
        return env


# -- the process environment beyond TPM_FAAS_* ------------------------------------------------
# Other modules read the environment only through these functions. Writes are for what only
# the environment can carry: settings of processes started later (Parsl workers, ranks) and of
# libraries that read their configuration from it (torch.distributed's env:// rendezvous,
# torch's extension builder).


def search_path(env: Mapping[str, str] | None = None) -> list[str]:
    """The directories of ``PATH`` (``env`` defaults to ``os.environ``), in order."""
    e = os.environ if env is None else env
    return [p for p in e.get("PATH", "").split(os.pathsep) if p]


def path_with_first(directory: str, env: Mapping[str, str] | None = None) -> str:
    """``PATH`` with ``directory`` first (moved there if it is further down)."""
    rest = [p for p in search_path(env) if p != directory]
    return os.pathsep.join([directory, *rest])


def torch_extensions_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """Where the site keeps torch's JIT-built extensions (``TORCH_EXTENSIONS_DIR``), if set."""
    e = os.environ if env is None else env
    value = e.get("TORCH_EXTENSIONS_DIR")
    return Path(value) if value else None


def set_process_env(values: Mapping[str, str]) -> dict[str, str | None]:
    """Write ``values`` into this process's environment, for the children it starts later and
    the libraries that read it; returns the previous values (``None``: was unset), for
    :func:`restore_process_env`."""
    saved: dict[str, str | None] = {}
    for key, value in values.items():
        saved[key] = os.environ.get(key)
        os.environ[key] = value
    return saved


def restore_process_env(saved: Mapping[str, str | None]) -> None:
    """Undo :func:`set_process_env` with the values it returned."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def task_id(env: Mapping[str, str] | None = None) -> str | None:
    """The Globus Compute task this worker runs (``GC_TASK_UUID``, set by the endpoint's
    worker for each task), if any: the default request id."""
    e = os.environ if env is None else env
    return e.get("GC_TASK_UUID") or None


def settings_key(env: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """The part of the environment :meth:`Settings.from_env` reads (``TPM_FAAS_*`` and
    ``HOME``), as a hashable key: a worker keeps one gateway per distinct key."""
    e = os.environ if env is None else env
    return tuple(sorted((k, v) for k, v in e.items() if k.startswith("TPM_FAAS_") or k == "HOME"))
