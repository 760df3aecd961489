"""``tpm-faas auth``: the TPM resource server's scopes in Globus Auth
(:mod:`tpm_faas.globus_auth`)."""

from __future__ import annotations

import click


@click.group()
def auth() -> None:
    """Globus Auth for the TPM resource server."""


@auth.command("setup")
@click.option(
    "--client-id",
    envvar="TPM_FAAS_CLIENT_ID",
    required=True,
    help="The resource server's client id (TPM_FAAS_CLIENT_ID).",
)
@click.option(
    "--client-secret",
    envvar="TPM_FAAS_CLIENT_SECRET",
    required=True,
    help="Its secret (TPM_FAAS_CLIENT_SECRET).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be created; change nothing.")
@click.option(
    "--groups",
    is_flag=True,
    help="Let the endpoint look up callers' Globus groups (a dependent scope on Groups).",
)
def auth_setup(client_id: str, client_secret: str, dry_run: bool, groups: bool) -> None:
    """Create the scopes of the modes on the resource server (those missing). Fails within
    seconds when Globus Auth cannot be reached."""
    from tpm_faas.globus_auth import setup_scopes

    for a in setup_scopes(client_id, client_secret, dry_run=dry_run, groups=groups):
        click.echo(f"{a.action:<12} {a.mode:<10} {a.scope}")
