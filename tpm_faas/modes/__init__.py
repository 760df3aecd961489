"""The inference modes, one module each, and the one registry of them.

:data:`MODES` is the only list of modes: the CLI's choices, the Globus Auth scopes
(:mod:`tpm_faas.globus_auth`, :mod:`tpm_faas.gateway.auth`), function registration
(:mod:`tpm_faas.functions`, :mod:`tpm_faas.compute.sdk`), the policy's mode names, the shard
group's dispatch (:mod:`tpm_faas.runtime.rank`) and the client read it. A new mode is a
:class:`~tpm_faas.modes.base.Mode` subclass in its own module, added here.
"""

from __future__ import annotations

import json

from tpm_faas.errors import RequestError
from tpm_faas.modes.base import Admission, Mode
from tpm_faas.modes.embed import EmbedMode
from tpm_faas.modes.intervene import InterveneMode
from tpm_faas.modes.query import QueryMode

#: The registry: every mode by name, in the order they are listed to users.
MODES: dict[str, Mode] = {m.name: m for m in (QueryMode(), EmbedMode(), InterveneMode())}
#: The mode names, in registry order.
MODE_NAMES: tuple[str, ...] = tuple(MODES)


def get_mode(name: str) -> Mode:
    """The mode called ``name``.

    :raises RequestError: no such mode
    """
    mode = MODES.get(name) if isinstance(name, str) else None
    if mode is None:
        raise RequestError(f"unknown mode {name!r} (one of {', '.join(MODE_NAMES)})")
    return mode


def by_shard_op(op: str) -> Mode | None:
    """The mode whose shard op is ``op`` (``None`` for control ops and unknown ones)."""
    return next((m for m in MODES.values() if m.shard_op == op), None)


def json_schema(mode: str) -> str:
    """The JSON Schema of ``mode``'s requests, as published in ``docs/schemas/``."""
    schema = get_mode(mode).request_model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://tpm-faas.example/schemas/{mode}.schema.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


__all__ = [
    "MODES",
    "MODE_NAMES",
    "Admission",
    "EmbedMode",
    "InterveneMode",
    "Mode",
    "QueryMode",
    "by_shard_op",
    "get_mode",
    "json_schema",
]
