"""Test doubles and dev tools that ship with the package (like ``globus_sdk.testing``).

Use them to test a site's own policies and clients without a GPU, a cluster or the Globus
cloud:

- :class:`EmbeddedSite`: everything on one machine (real engine, real shard group, SQLite);
- :func:`write_dev_tokens`, :data:`DEV_USERS`: a dev tokens file for local introspection;
- :class:`FakeShard`: a shard group that answers typed shard messages without a model, and
  :func:`fake_site`: a gateway on real site components (policy, dev tokens, SQLite ledger)
  whose shard group is a :class:`FakeShard`;
- :class:`InProcessTransport`: the mode functions called in this process;
- :class:`LoopbackComputeService`: the Globus Compute web service's routes on loopback, for
  the unmodified SDK ``Executor``.

Names are imported on first use, so ``import tpm_faas.testing`` loads nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "EmbeddedSite": "tpm_faas.testing.embedded",
    "DEV_USERS": "tpm_faas.testing.embedded",
    "write_dev_tokens": "tpm_faas.testing.embedded",
    "FAKE_MODEL": "tpm_faas.testing.shard",
    "FakeShard": "tpm_faas.testing.shard",
    "fake_site": "tpm_faas.testing.shard",
    "InProcessTransport": "tpm_faas.testing.transport",
    "LoopbackComputeService": "tpm_faas.testing.loopback",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
