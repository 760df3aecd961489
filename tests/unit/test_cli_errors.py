"""The typical mistakes of a site admin, through the real ``tpm-faas`` executable: each prints
one line naming the problem on stderr and exits with its documented code, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpm_faas.compute.templates import TEMPLATES
from tpm_faas.config import POLICIES
from tpm_faas.errors import (
    AuthError,
    ConfigError,
    LedgerError,
    PolicyDenied,
    ServiceUnreachable,
)
from tpm_faas.modes import MODE_NAMES

EXE = Path(sys.executable).parent / "tpm-faas"
#: A port nothing listens on: "no network" for HTTP clients told to use it as their proxy.
CLOSED = "http://127.0.0.1:1"


def run(
    *args: str, env: dict[str, str] | None = None, home: Path | None = None
) -> tuple[int, str, str, float]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("TPM_FAAS_", "GLOBUS_"))}
    if home is not None:
        e["TPM_FAAS_HOME"] = str(home)
    e.update(env or {})
    t0 = time.monotonic()
    p = subprocess.run(
        [str(EXE), *args],
        capture_output=True,
        text=True,
        env=e,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


def one_line_error(code: int, out: str, err: str, expected: int) -> str:
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tpm-faas: error: "), err
    assert code == expected, (code, err)
    return lines[0]


def test_endpoint_render_with_a_missing_vars_file(tmp_path: Path) -> None:
    template = TEMPLATES / "provider" / "config.yaml.j2"
    missing = tmp_path / "missing.yaml"
    code, out, err, _ = run("endpoint", "render", str(template), "--vars", str(missing))
    line = one_line_error(code, out, err, ConfigError.exit_code)
    assert str(missing) in line and "No such file" in line


def test_deploy_with_a_missing_vars_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    code, out, err, _ = run("deploy", "--vars", str(missing), home=tmp_path)
    assert str(missing) in one_line_error(code, out, err, ConfigError.exit_code)


def test_launch_with_a_missing_allocation_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    code, out, err, _ = run("launch", "--allocation", str(missing), home=tmp_path)
    assert str(missing) in one_line_error(code, out, err, ConfigError.exit_code)


def test_invalid_yaml_names_the_file_and_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "alloc.yaml"
    bad.write_text("provider: slurm\naccount: [unclosed\n")
    code, out, err, _ = run("launch", "--allocation", str(bad), home=tmp_path)
    line = one_line_error(code, out, err, ConfigError.exit_code)
    assert str(bad) in line and "not valid YAML" in line and "line" in line
    not_a_mapping = tmp_path / "vars.yaml"
    not_a_mapping.write_text("- a\n- b\n")
    code, out, err, _ = run("deploy", "--vars", str(not_a_mapping), home=tmp_path)
    assert "must be a YAML mapping" in one_line_error(code, out, err, ConfigError.exit_code)
    policy = tmp_path / "p.yaml"
    policy.write_text("groups: [oops")
    code, out, err, _ = run("policy", "check", str(policy))
    assert "not valid YAML" in one_line_error(code, out, err, ConfigError.exit_code)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file(tmp_path: Path) -> None:
    f = tmp_path / "vars.yaml"
    f.write_text("a: 1\n")
    f.chmod(0)
    code, out, err, _ = run("deploy", "--vars", str(f), home=tmp_path)
    assert "Permission denied" in one_line_error(code, out, err, ConfigError.exit_code)


@pytest.mark.parametrize("command", [["usage"], ["ledger", "reconcile"], ["ledger", "balance"]])
def test_ledger_commands_without_a_home_directory(tmp_path: Path, command: list[str]) -> None:
    home = tmp_path / "nowhere"
    code, out, err, _ = run(*command, home=home)
    line = one_line_error(code, out, err, ConfigError.exit_code)
    assert str(home) in line and "does not exist" in line
    assert not home.exists()  # a report never creates the state it reports on


@pytest.mark.parametrize("command", [["usage"], ["ledger", "reconcile"]])
def test_an_unreachable_postgresql_ledger(tmp_path: Path, command: list[str]) -> None:
    url = "postgresql+psycopg://user:secret@127.0.0.1:1/x"
    code, out, err, took = run(*command, env={"TPM_FAAS_LEDGER": url}, home=tmp_path)
    line = one_line_error(code, out, err, LedgerError.exit_code)
    assert "secret" not in out + err
    assert "postgresql+psycopg://user:***@127.0.0.1:1/x" in line
    assert took < 20, took


def test_auth_setup_without_a_network_fails_in_seconds(tmp_path: Path) -> None:
    code, out, err, took = run(
        "auth",
        "setup",
        "--client-id",
        "6b8f0b44-1a3c-4d7e-9d0f-2f1e7c5a9b10",
        "--client-secret",
        "s",
        "--dry-run",
        env={"https_proxy": CLOSED, "HTTPS_PROXY": CLOSED, "HOME": str(tmp_path)},
    )
    line = one_line_error(code, out, err, ServiceUnreachable.exit_code)
    assert "cannot reach https://auth.globus.org/" in line
    assert took < 15, took


def test_register_without_a_network_fails_in_seconds(tmp_path: Path) -> None:
    # A service client (what a site's automation uses): its token request cannot get out.
    code, out, err, took = run(
        "register",
        "--endpoint",
        "00000000-0000-4000-8000-000000000001",
        "--out",
        str(tmp_path / "m.json"),
        env={
            "https_proxy": CLOSED,
            "HTTPS_PROXY": CLOSED,
            "HOME": str(tmp_path),
            "GLOBUS_COMPUTE_CLIENT_ID": "6b8f0b44-1a3c-4d7e-9d0f-2f1e7c5a9b10",
            "GLOBUS_COMPUTE_CLIENT_SECRET": "s",
        },
    )
    line = one_line_error(code, out, err, ServiceUnreachable.exit_code)
    assert "cannot reach https://" in line
    assert took < 15, took
    assert not (tmp_path / "m.json").exists()


def test_register_with_no_login_and_no_terminal(tmp_path: Path) -> None:
    code, out, err, took = run(
        "register",
        "--endpoint",
        "00000000-0000-4000-8000-000000000001",
        env={"https_proxy": CLOSED, "HTTPS_PROXY": CLOSED, "HOME": str(tmp_path)},
    )
    line = one_line_error(code, out, err, AuthError.exit_code)
    assert "not logged in to Globus Compute" in line
    assert took < 15, took


def test_policy_check_suggests_the_closest_key(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text(
        (POLICIES / "local-dev.yaml").read_text().replace("max_new_tokens:", "max_new_token:", 1)
    )
    code, out, err, _ = run("policy", "check", str(bad))
    line = one_line_error(code, out, err, ConfigError.exit_code)
    assert "unknown key 'max_new_token'; did you mean 'max_new_tokens'?" in line
    assert ".limits.max_new_token" in line


def test_policy_explain_denied_is_one_line_and_exit_4() -> None:
    code, out, err, _ = run(
        "policy", "explain", str(POLICIES / "local-dev.yaml"), "--identity", "eve@x", "--mode",
        "query",
    )  # fmt: skip
    assert "no group" in one_line_error(code, out, err, PolicyDenied.exit_code)
    assert "does not match" in out  # the explanation still comes first, on stdout


def test_help_lists_the_exit_codes() -> None:
    code, out, err, _ = run("--help")
    assert code == 0, err
    text = out[out.index("Exit codes:") :]
    for n in range(9):
        assert f"\n    {n}  " in text, text
    code, out, _, _ = run("schema", "--help")
    assert f"[{'|'.join(MODE_NAMES)}]" in out  # the choices come from the registry


def test_python_m_runs_the_same_cli(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "tpm_faas", "launch", "--allocation", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "TPM_FAAS_HOME": str(tmp_path)},
    )
    one_line_error(p.returncode, p.stdout, p.stderr, ConfigError.exit_code)
