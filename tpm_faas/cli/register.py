"""``tpm-faas register``: the mode functions in Globus Compute (:mod:`tpm_faas.compute.sdk`)."""

from __future__ import annotations

from pathlib import Path

import click

from tpm_faas.modes import MODE_NAMES


@click.command()
@click.option(
    "--endpoint",
    "endpoints",
    multiple=True,
    required=True,
    help="An endpoint id that serves the functions (repeatable).",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    default=("demo-tpm@1",),
    show_default=True,
    help="A model@version the endpoints serve (repeatable).",
)
@click.option(
    "--group",
    "groups",
    multiple=True,
    metavar="MODE=GROUP_ID",
    help="Share a mode's function with a Globus group (repeatable).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("tpm-faas-functions.json"),
    show_default=True,
    help="Where to write the function manifest.",
)
@click.option(
    "--local-services",
    is_flag=True,
    help="Register with the loopback stand-in on localhost:5000 (tests, demos).",
)
def register(
    endpoints: tuple[str, ...],
    models: tuple[str, ...],
    groups: tuple[str, ...],
    out: Path,
    local_services: bool,
) -> None:
    """Register the mode functions with Globus Compute and write the function manifest.
    Fails within seconds when the Globus services cannot be reached."""
    from tpm_faas.compute.sdk import compute_client
    from tpm_faas.compute.sdk import register as register_functions
    from tpm_faas.errors import RequestError

    shared: dict[str, str] = {}
    for g in groups:
        mode, sep, gid = g.partition("=")
        if not sep or mode not in MODE_NAMES or not gid:
            raise RequestError(
                f"--group takes MODE=GROUP_ID with MODE one of {', '.join(MODE_NAMES)}, not {g!r}"
            )
        shared[mode] = gid
    manifest = register_functions(
        compute_client(local_services=local_services, interactive=_interactive()),
        endpoints=endpoints,
        models=models,
        groups=shared,
    )
    manifest.write(out)
    for mode, fid in manifest.functions.items():
        click.echo(
            f"{mode:<10} {fid}"
            + (f"  (shared with group {shared[mode]})" if mode in shared else "")
        )
    click.echo(f"wrote {out} ({manifest.web_service}; endpoints {', '.join(manifest.endpoints)})")


def _interactive() -> bool:
    """Whether a person can answer a Globus login prompt here."""
    import sys

    return sys.stdin.isatty()
