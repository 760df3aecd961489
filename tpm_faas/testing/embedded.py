"""The embedded default: the whole path on one machine.

A shard group started through Parsl (``LocalProvider``), a local endpoint running the real
Globus Compute engine, a SQLite ledger, the bundled ``local-dev.yaml`` policy
(``tpm_faas/data/policies``) and a file of dev tokens, all under one state directory.
:class:`EmbeddedSite` brings them up and down;
``tpm-faas demo`` and the integration tests use it.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from tpm_faas.client import TPMClient
from tpm_faas.config import POLICIES, Settings
from tpm_faas.gateway.ledger import Ledger
from tpm_faas.modes import MODE_NAMES


@dataclass(frozen=True)
class DevUser:
    identity: str
    scopes: tuple[str, ...]
    project: str
    su: float


#: Dev users of the bundled ``local-dev.yaml`` policy and the SU their projects start with.
#: Every token carries every mode's scope: the reader's too (the site policy keeps it from
#: embed).
DEV_USERS: dict[str, DevUser] = {
    "dev": DevUser("dev@localhost", MODE_NAMES, "demo", 100.0),
    "reader": DevUser("reader@localhost", MODE_NAMES, "readers", 10.0),
    "broke": DevUser("broke@localhost", MODE_NAMES, "broke", 0.000001),
}


def write_dev_tokens(path: Path, client_id: str = "local-dev") -> dict[str, str]:
    """Write a dev tokens file with one fresh token per dev user (plus an expired one and a
    query-only one for ``dev``); returns name -> token."""
    now = datetime.now(UTC)
    tokens: dict[str, str] = {}
    entries: list[dict[str, Any]] = []

    def add(name: str, identity: str, scopes: list[str], expires: datetime) -> None:
        tokens[name] = f"tpmdev-{name}-{secrets.token_urlsafe(24)}"
        entries.append(
            {
                "token": tokens[name],
                "identity": identity,
                "scopes": scopes,
                "expires_at": expires.isoformat(),
            }
        )

    for name, user in DEV_USERS.items():
        add(name, user.identity, list(user.scopes), now + timedelta(days=30))
    add("dev-expired", "dev@localhost", list(MODE_NAMES), now - timedelta(hours=1))
    add("dev-query-only", "dev@localhost", ["query"], now + timedelta(days=30))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"client_id": client_id, "tokens": entries}, sort_keys=False))
    os.chmod(path, 0o600)
    return tokens


@dataclass
class EmbeddedSite:
    """Everything of the embedded default under ``home``.

    :param home: state directory (registry, ledger, dev tokens, run dirs)
    :param tp_size: ranks of the shard group
    :param model: the model to serve
    :param policy_path: the site policy file
    """

    home: Path
    tp_size: int = 1
    model: str = "demo-tpm@1"
    policy_path: Path = field(default_factory=lambda: POLICIES / "local-dev.yaml")
    model_roots: tuple[Path, ...] | None = None
    dtype: str = "float32"
    settings: Settings = field(init=False)
    tokens: dict[str, str] = field(default_factory=dict, init=False)
    group: Any = field(default=None, init=False)
    endpoint: Any = field(default=None, init=False)
    transport: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.home = self.home.resolve()
        overrides: dict[str, object] = {
            "home": self.home,
            "policy_path": self.policy_path.resolve(),
            "auth_backend": "local",
            "dev_tokens_path": self.home / "dev-tokens.yaml",
            "ledger_url": f"sqlite:///{self.home / 'ledger.sqlite'}",
            "mapped_identity": None,
        }
        if self.model_roots is not None:
            overrides["model_roots"] = tuple(p.resolve() for p in self.model_roots)
        self.settings = Settings.from_env({}, **overrides)

    def start(self, progress: Callable[[str], None] | None = None) -> EmbeddedSite:
        """Bring up the shard group and the local endpoint (in parallel)."""
        from tpm_faas.compute.local_endpoint import LocalEndpoint
        from tpm_faas.compute.transport import LocalEngineTransport
        from tpm_faas.launcher import ShardGroup

        if self.endpoint is not None or self.group is not None:
            raise RuntimeError("this EmbeddedSite is already started")
        say = progress or (lambda _m: None)
        self.home.mkdir(parents=True, exist_ok=True)
        assert self.settings.dev_tokens_path is not None
        self.tokens = write_dev_tokens(self.settings.dev_tokens_path, self.settings.client_id)
        ledger = Ledger(self.settings.ledger_url)
        for user in DEV_USERS.values():
            ledger.credit(user.project, round(user.su * 1e6), reference=f"seed:{user.project}")
        ledger.close()

        self.group = ShardGroup(
            self.model, self.tp_size, self.settings, self.home / "runs" / "shards", dtype=self.dtype
        )
        failure: list[BaseException] = []

        def start_group() -> None:
            try:
                self.group.start(progress=say)
            except BaseException as e:
                failure.append(e)

        t = threading.Thread(target=start_group, name="start-shard-group")
        t.start()
        say("starting the local Globus Compute endpoint (GlobusComputeEngine, LocalProvider)")
        self.endpoint = LocalEndpoint(self.home / "runs" / "endpoint", env=self.settings.to_env())
        try:
            self.endpoint.start()
            self.transport = LocalEngineTransport(self.endpoint)
        finally:
            t.join()
        if failure:
            self.stop()
            raise failure[0]
        say("local endpoint is up; mode functions registered")
        return self

    def client(self, user: str = "dev", **kwargs: Any) -> TPMClient:
        """A client acting as dev user ``user`` (see :data:`DEV_USERS`)."""
        return TPMClient(
            self.transport, token=self.tokens.get(user, user), model=self.model, **kwargs
        )

    def ledger(self) -> Ledger:
        return Ledger(self.settings.ledger_url)

    def stop(self) -> None:
        """Tear everything down; safe to call twice."""
        if self.endpoint is not None:
            self.endpoint.shutdown()
            self.endpoint = None
        if self.group is not None:
            self.group.stop()
            self.group = None

    def __enter__(self) -> EmbeddedSite:
        # ``with EmbeddedSite(...).start(progress=...) as site:`` must not start it twice.
        return self if self.endpoint is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
