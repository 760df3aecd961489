"""Optional dependencies: import one, or say which extra of tpm_faas brings it.

``pip install tpm-faas`` is the client (TPMClient, the Globus Compute SDK transport, Globus
tokens, result decoding). What a site runs comes with extras (see ``docs/install.md``)::

    gateway    sqlalchemy, pyzmq             the request pipeline, the SU ledger, shard clients
    endpoint   globus-compute-endpoint       the embedded endpoint, endpoint templates
    runtime    torch, deepspeed, transformers the shard-group ranks
    launch     parsl, pyzmq                  starting shard groups (tpm-faas launch / deploy)
    site       all four
    postgres   psycopg                       a PostgreSQL ledger
    plot       matplotlib                    tpm-faas usage --plot
    versions   zstandard                     the version store's tensor codec (also in runtime)

Code that builds an object needing one of them calls :func:`require` first, so a client-only
install fails there with one line naming the extra, not with an ``ImportError`` deep inside.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tpm_faas.errors import MissingExtra

#: The extras of tpm_faas (``[project.optional-dependencies]`` in pyproject.toml).
EXTRAS = (
    "gateway",
    "endpoint",
    "runtime",
    "launch",
    "site",
    "postgres",
    "plot",
    "versions",
    "test",
)
#: Distributions a client-only install (no extras) never pulls in: each comes with an extra.
HEAVY = frozenset(
    {
        "torch",
        "deepspeed",
        "parsl",
        "transformers",
        "globus-compute-endpoint",
        "sqlalchemy",
        "pyzmq",
    }
)


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``; if it is not installed, raise :class:`MissingExtra` naming ``extra``.

    :param module: the module to import (``"torch"``, ``"globus_compute_endpoint.engines"``)
    :param extra: the extra of tpm_faas that installs it (one of :data:`EXTRAS`)
    :returns: the imported module
    :raises MissingExtra: the module (or one it needs) is not installed
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; tpm_faas has {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        # Only a missing distribution is ours to explain; a module that is installed but
        # fails inside its own import is a real error and propagates as it is.
        missing = e.name or module
        if not _is_part_of(missing, module):
            raise
        err = MissingExtra(
            f"{module} is not installed: it comes with the {extra!r} extra "
            f"(pip install 'tpm-faas[{extra}]')"
        )
        err.name = missing
        raise err from e


def _is_part_of(missing: str, module: str) -> bool:
    """Whether ``missing`` is ``module`` itself or one of its parent packages."""
    return module == missing or module.startswith(missing + ".")
