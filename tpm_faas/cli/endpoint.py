"""``tpm-faas endpoint``: render Globus Compute endpoint templates
(:mod:`tpm_faas.compute.templates`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tpm_faas.cli._app import read_yaml_mapping

_FILE = click.Path(path_type=Path, dir_okay=False)


def read_vars(vars_file: Path | None, manifest: Path | None) -> dict[str, Any]:
    """A template's variables: ``vars_file`` (a YAML mapping) plus, from ``manifest``,
    ``allowed_functions``."""
    from tpm_faas.compute.sdk import Manifest

    variables: dict[str, Any] = {}
    if vars_file is not None:
        variables.update(read_yaml_mapping(vars_file, "variables file"))
    if manifest is not None:
        variables["allowed_functions"] = list(Manifest.load(manifest).functions.values())
    return variables


@click.group()
def endpoint() -> None:
    """Globus Compute endpoint templates."""


@endpoint.command("render")
@click.argument("template", type=_FILE)
@click.option("--vars", "vars_file", type=_FILE, help="A YAML file of the template's variables.")
@click.option(
    "--manifest", type=_FILE, help="A function manifest: its ids become allowed_functions."
)
@click.option(
    "--identity",
    default="00000000-0000-4000-8000-0000000000ee",
    show_default=True,
    help="The Globus identity to render for (user templates).",
)
@click.option(
    "--policy",
    "policy_file",
    type=_FILE,
    help="The site policy the endpoint's workers use: validated too.",
)
@click.option("--out", type=_FILE, help="Write the rendered config here (default: print it).")
def endpoint_render(
    template: Path,
    vars_file: Path | None,
    manifest: Path | None,
    identity: str,
    policy_file: Path | None,
    out: Path | None,
) -> None:
    """Render TEMPLATE through the endpoint's own renderer and loader.

    For a multi-user (manager) config, the user endpoint template beside it is rendered and
    loaded too, with no user variables, so the pair is known to work before deployment.
    """
    from tpm_faas.compute.templates import render

    if policy_file is not None:
        from tpm_faas.policy import Policy

        p = Policy.load(policy_file)
        click.echo(f"{policy_file}: valid policy (sha256 {p.sha256[:16]}...)", err=True)
    variables = read_vars(vars_file, manifest)
    r = render(template, variables, identity=identity)
    user_template = template.parent / "user_config_template.yaml.j2"
    if r.kind == "manager" and user_template.is_file():
        u = render(user_template, {}, identity=identity)
        click.echo(f"{user_template}: rendered and loaded ({u.kind} config)", err=True)
    if out is None:
        click.echo(r.text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(r.text)
    click.echo(f"{template}: rendered and loaded ({r.kind} config)", err=True)
