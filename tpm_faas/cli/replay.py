"""``tpm-faas replay``: run a saved result's request again and say whether it came out the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tpm_faas.cli._app import echo_json, read_json


@click.command("replay")
@click.argument(
    "result_file", metavar="RESULT.json", type=click.Path(dir_okay=False, path_type=Path)
)
@click.option(
    "--request",
    "request_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The request the result was made from, as sent (JSON).",
)
@click.option(
    "--token",
    envvar="TPM_FAAS_TOKEN",
    help="Access token for the TPM resource server (env TPM_FAAS_TOKEN).",
)
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Replay through Globus Compute with this function manifest (default: this site's "
    "gateway, in this process, with its settings).",
)
@click.option("--endpoint", help="The manifest's endpoint to run on (default: its first).")
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the results' tensor files are when their URI is not readable here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def replay(
    result_file: Path,
    request_file: Path,
    token: str | None,
    manifest: Path | None,
    endpoint: str | None,
    results_dir: Path | None,
    as_json: bool,
) -> None:
    """Run the request of RESULT.json (a mode's reply, as saved) again on the model version its
    receipt names, and compare bit for bit.

    Exits 0 when the replay is identical; 1 with where it first differs (prompt, token index,
    site, largest difference) otherwise. The request must be the one the receipt hashes."""
    import json

    from pydantic import ValidationError

    from tpm_faas.client import TPMClient, parse_reply
    from tpm_faas.errors import ConfigError, TPMError

    try:
        original = parse_reply(json.dumps(read_json(result_file, "result")), results_dir)
    except ValidationError as e:
        where = ".".join(str(p) for p in e.errors()[0]["loc"]) or "reply"
        raise ConfigError(
            f"{result_file} is not a saved mode reply: {where}: {e.errors()[0]['msg']}"
        ) from None
    request = read_json(request_file, "request")
    if not isinstance(request, dict):
        raise click.BadParameter("the request must be a JSON object", param_hint="--request")
    client = TPMClient(
        _transport(manifest, endpoint),
        token=token,
        model=original.receipt.model,
        results_dir=results_dir,
    )
    try:
        report = client.replay(original, request)
    except TPMError:
        raise
    except (OSError, ValueError) as e:  # a results file that is gone or does not hash
        raise ConfigError(f"cannot read a result's tensors: {e}") from None
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo(report.summary())
        for d in report.differences[1:]:
            click.echo(f"  also: {d.describe()}")
        for k, (was, now) in report.receipt_changes.items():
            if k != "versions":
                click.echo(f"  receipt {k}: {was} -> {now}")
    if not report.identical:
        raise SystemExit(1)


def _transport(manifest: Path | None, endpoint: str | None) -> Any:
    if manifest is None:
        from tpm_faas.config import Settings
        from tpm_faas.gateway.pipeline import Gateway
        from tpm_faas.testing.transport import InProcessTransport

        return InProcessTransport(Gateway.from_settings(Settings.from_env()))
    from tpm_faas.compute.sdk import ExecutorTransport, Manifest, compute_client

    m = Manifest.load(manifest)
    return ExecutorTransport.from_manifest(m, compute_client(), endpoint)
