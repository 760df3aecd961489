"""`import tpm_faas` and `tpm-faas --help` stay light: no torch, deepspeed, parsl or Compute SDK."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "torch",
    "deepspeed",
    "parsl",
    "globus_compute_sdk",
    "globus_compute_endpoint",
    "transformers",
)

PROBE = """
import sys
{body}
heavy = [m for m in {heavy!r} if m in sys.modules]
print(",".join(heavy))
"""


def _heavy_after(body: str) -> list[str]:
    out = (
        subprocess.run(
            [sys.executable, "-c", PROBE.format(body=body, heavy=HEAVY)],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    return [m for m in out[-1].split(",") if m] if out else []


def test_import_package_is_light() -> None:
    assert (
        _heavy_after("import tpm_faas, tpm_faas.client, tpm_faas.gateway, tpm_faas.functions") == []
    )


def test_cli_help_is_light() -> None:
    body = (
        "from click.testing import CliRunner\n"
        "from tpm_faas.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0 and 'demo' in r.output, r.output\n"
    )
    assert _heavy_after(body) == []


def test_public_all_is_sorted_and_complete() -> None:
    import tpm_faas

    assert list(tpm_faas.__all__) == sorted(tpm_faas.__all__)
    for name in tpm_faas.__all__:
        assert hasattr(tpm_faas, name), name
