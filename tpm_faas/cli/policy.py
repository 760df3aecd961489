"""``tpm-faas policy``: check, explain and publish site policy files (:mod:`tpm_faas.policy`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tpm_faas.cli._app import echo_json, read_json
from tpm_faas.modes import MODE_NAMES

_FILE = click.Path(path_type=Path, dir_okay=False)


@click.group()
def policy() -> None:
    """Validate and explain site policy files."""


@policy.command("check")
@click.argument("file", type=_FILE)
@click.option("--json", "as_json", is_flag=True, help="Print what the file grants as JSON.")
def policy_check(file: Path, as_json: bool) -> None:
    """Validate FILE; errors name the path of the bad key (and the closest known key)."""
    from tpm_faas.policy import Policy

    p = Policy.load(file)
    if as_json:
        echo_json({"valid": True, **p.summary()})
        return
    d = p.data
    click.echo(f"{file}: valid (sha256 {p.sha256})")
    click.echo(
        f"  {len(d.groups)} groups, {len(d.models)} models, {len(d.projects)} projects, "
        f"tiers {', '.join(f'{k}={v}' for k, v in d.tiers.items())}; default {d.default}"
    )
    for g in d.groups:
        click.echo(
            f"  group {g.name}: {', '.join(g.modes)} on {', '.join(g.models)} -> project "
            f"{g.allocation} (tier {g.tier}{', writes' if g.limits.write else ''})"
        )
    for w in p.warnings():
        click.echo(f"  warning: {w}")


@policy.command("explain")
@click.argument("file", type=_FILE)
@click.option("--identity", required=True, help="Globus identity id or username.")
@click.option("--username", default="", help="Username, if --identity is an id.")
@click.option("--group", "groups", multiple=True, help="A Globus group id of the caller.")
@click.option("--mode", type=click.Choice(MODE_NAMES), required=True)
@click.option("--model", default=None, help="name@version (default: the request's, or the first)")
@click.option(
    "--request",
    "request_file",
    type=_FILE,
    help="A request JSON file: also check it against the limits and price its worst case.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
def policy_explain(
    file: Path,
    identity: str,
    username: str,
    groups: tuple[str, ...],
    mode: str,
    model: str | None,
    request_file: Path | None,
    as_json: bool,
) -> None:
    """Print the decision FILE makes for a caller, a mode and (optionally) a request, and why
    (exit 4 if the policy denies)."""
    from tpm_faas.errors import PolicyDenied
    from tpm_faas.policy import Caller, Policy

    p = Policy.load(file)
    body = read_json(request_file, "request file") if request_file else None
    if body is not None and not isinstance(body, dict):
        from tpm_faas.errors import ConfigError

        raise ConfigError(f"request file {request_file} must hold a JSON object")
    model = model or (body or {}).get("model") or next(iter(p.data.models))
    caller = Caller(
        identity, username or (identity if "@" in identity else ""), frozenset(), frozenset(groups)
    )
    ex = p.explain(caller, mode=mode, model=str(model))
    d = ex.decision
    if as_json:
        worst = _price(d, mode, str(model), body) if body is not None and d else None
        echo_json({"policy": str(file), "sha256": p.sha256, **ex.record(), "request": worst})
    else:
        click.echo(f"policy {file} (sha256 {p.sha256[:16]}...)")
        click.echo(f"caller {caller.username or caller.identity}, mode {mode}, model {model}")
        for v in ex.groups:
            click.echo(f"  group {v.group}: {'matches; ' + v.why if v.matches else v.why}")
        if d is not None:
            click.echo(
                f"ADMIT as group {d.group}: project {d.project}, tier {d.tier} (x{d.multiplier})"
            )
            lim = d.limits.model_dump(exclude_defaults=False)
            click.echo(
                "  limits: " + ", ".join(f"{k}={v}" for k, v in lim.items() if v is not None)
            )
            if body is not None:
                w = _price(d, mode, str(model), body)
                click.echo(
                    f"  request admitted: worst case {w['input_tokens']} tokens in, "
                    f"{w['output_tokens']} out, {w['bytes_returned']} bytes, "
                    f"{w['hooked_sites']} hook sites -> hold {w['hold_su']:.6f} SU"
                )
    if ex.denied is not None:
        raise PolicyDenied(ex.denied)


def _price(decision: Any, mode: str, model: str, body: dict[str, Any]) -> dict[str, Any]:
    """Admit ``body`` as a ``mode`` request under ``decision``'s limits; its worst case."""
    import json

    from tpm_faas.catalog import model_info, resolve
    from tpm_faas.config import Settings
    from tpm_faas.gateway.ledger import to_su
    from tpm_faas.gateway.pipeline import parse
    from tpm_faas.modes import MODES

    info = model_info(model, resolve(model, Settings.from_env().model_roots))
    m = MODES[mode]
    adm = m.admit(
        parse(m.request_model, json.dumps({"model": model, **body})), info, decision.limits
    )
    w = adm.worst
    hold = decision.price_micro(w)
    return {
        "input_tokens": w.input_tokens,
        "output_tokens": w.output_tokens,
        "bytes_returned": w.bytes_returned,
        "hooked_sites": w.hooked_sites,
        "hold_micro": hold,
        "hold_su": to_su(hold),
    }


@policy.command("schema")
def policy_schema() -> None:
    """Print the JSON Schema of policy files (tpm_faas/data/policies/schema.json)."""
    from tpm_faas.policy import json_schema

    click.echo(json_schema(), nl=False)
