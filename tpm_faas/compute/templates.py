"""Endpoint templates, rendered and checked by the Globus Compute endpoint's own code.

The templates ship in the package (:data:`TEMPLATES`, ``tpm_faas/data/endpoint_templates/``).
``provider/`` is a multi-user endpoint (``config.yaml.j2``, site variables in
``config.schema.json``) with the template of each caller's user endpoint
(``user_config_template.yaml.j2`` + ``user_config_schema.json``);
``byo/`` is a researcher's own endpoint and shard group on an allocation
they own. :func:`render` goes through ``globus_compute_endpoint``'s renderer: variables are
validated against the template's schema (``<name>.schema.json``, else the directory's
``user_config_schema.json``), every string is quoted
(no YAML injection), ``shell_escape`` quotes values for the shell, and the Jinja environment
is sandboxed; the result is loaded with the endpoint's config loader (endpoint configs) or
:class:`tpm_faas.launcher.Allocation` (shard groups), so a template that renders is one the
endpoint accepts.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tpm_faas._extras import require
from tpm_faas.config import ENDPOINT_TEMPLATES
from tpm_faas.errors import ConfigError

#: The bundled endpoint templates (package data).
TEMPLATES = ENDPOINT_TEMPLATES


@dataclass(frozen=True)
class Rendered:
    text: str
    kind: str  # "manager" (multi-user endpoint), "endpoint" (with an engine), "shard_group"
    config: Any


def render(
    template: Path,
    variables: dict[str, Any],
    *,
    identity: str = "00000000-0000-4000-8000-0000000000ee",
) -> Rendered:
    """Render ``template`` with ``variables`` as the endpoint would for a caller mapped to the
    current user with Globus identity ``identity``, and load the result.

    :raises MissingExtra: ``globus-compute-endpoint`` is not installed (the ``endpoint`` extra)
    """
    require("globus_compute_endpoint", "endpoint")
    from globus_compute_endpoint.endpoint.config.utils import (
        load_config_yaml,
        load_user_config_schema,
        render_config_user_template,
    )
    from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity

    template = Path(template)
    if not template.is_file() or not template.name.endswith(".j2"):
        raise ConfigError(f"{template} is not a template (*.j2)")
    stem = template.name.removesuffix(".yaml.j2")
    own_schema = template.parent / f"{stem}.schema.json"
    schema = load_user_config_schema(
        own_schema if own_schema.is_file() else template.parent / "user_config_schema.json"
    )
    parent = None  # the manager endpoint's config, which user templates may read
    mapped = MappedPosixIdentity(
        local_user_record=pwd.getpwuid(os.getuid()),
        globus_identity_candidates=[],
        matched_identity=identity,
    )
    try:
        text = render_config_user_template(
            parent, template.read_text(), template, mapped, schema, dict(variables)
        )
    except Exception as e:  # jsonschema / jinja errors: say which variable and why
        msg = getattr(e, "message", None) or str(e)
        where = ".".join(str(p) for p in getattr(e, "absolute_path", []) or [])
        raise ConfigError(
            f"template {template.name}: {type(e).__name__}"
            + (f" at {where}" if where else "")
            + f": {msg}"
        ) from e
    if stem == "shard_group":
        return Rendered(text, "shard_group", shard_group_spec(text))
    config = _load(load_config_yaml, text)
    kind = "endpoint" if getattr(config, "engine", None) is not None else "manager"
    return Rendered(text, kind, config)


def shard_group_spec(text: str) -> dict[str, Any]:
    """A rendered ``shard_group.yaml``: model, tp, ep, dtype and a checked allocation."""
    from tpm_faas.launcher import Allocation

    raw = yaml.safe_load(text) or {}
    unknown = set(raw) - {"model", "tp", "ep", "dtype", "allocation"}
    if unknown:
        raise ConfigError(f"shard group spec: unknown keys {sorted(unknown)}")
    return {
        "model": str(raw["model"]),
        "tp": int(raw.get("tp", 1)),
        "ep": int(raw.get("ep", 1)),
        "dtype": str(raw.get("dtype", "float32")),
        "allocation": Allocation.from_dict(dict(raw.get("allocation") or {})),
    }


def _load(loader: Any, text: str) -> Any:
    try:
        config = loader(text)
    except Exception as e:
        raise ConfigError(f"the endpoint refuses the rendered config: {e}") from e
    engine = getattr(config, "engine", None)
    if engine is not None:  # built, never started: release what it made
        engine.shutdown()
    return config
