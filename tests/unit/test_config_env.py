"""The environment is read in one place, ``tpm_faas/config.py``; its helpers work."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from tpm_faas.config import (
    POLICIES,
    path_with_first,
    resolve_policy,
    restore_process_env,
    search_path,
    set_process_env,
    torch_extensions_dir,
)

PACKAGE = Path(__file__).resolve().parents[2] / "tpm_faas"
ENV_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}
#: Modules allowed to touch the environment outside config.py, each with the reason (none).
EXCEPTIONS: dict[str, str] = {}


def env_accesses(source: str) -> list[int]:
    """Lines of ``source`` that use ``os.environ``/``os.getenv``/... (code only, not text)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ENV_NAMES
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ) or (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(a.name in ENV_NAMES for a in node.names)
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_only_config_reads_the_environment() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "config.py" or rel in EXCEPTIONS:
            continue
        text = path.read_text()
        for n in env_accesses(text):
            offenders.append(f"tpm_faas/{rel}:{n}: {text.splitlines()[n - 1].strip()}")
    assert not offenders, "read the environment through tpm_faas.config:\n" + "\n".join(offenders)


def test_the_scan_finds_an_environment_read() -> None:
    """The scan itself (so the test above can fail)."""
    for code in ('x = os.environ.get("A")', 'os.getenv("A")', "os.environ['A'] = 'b'"):
        assert env_accesses(code) == [1], code
    assert env_accesses("from os import environ") == [1]
    assert env_accesses('"""Writes os.environ."""\nsettings.environment = 1') == []


def test_path_helpers() -> None:
    env = {"PATH": os.pathsep.join(["/a", "/b", "/c"])}
    assert search_path(env) == ["/a", "/b", "/c"]
    assert path_with_first("/b", env) == os.pathsep.join(["/b", "/a", "/c"])
    assert path_with_first("/z", {}) == "/z"
    assert torch_extensions_dir({}) is None
    assert torch_extensions_dir({"TORCH_EXTENSIONS_DIR": "/x"}) == Path("/x")


def test_set_and_restore_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPM_FAAS_TEST_A", "old")
    monkeypatch.delenv("TPM_FAAS_TEST_B", raising=False)
    saved = set_process_env({"TPM_FAAS_TEST_A": "new", "TPM_FAAS_TEST_B": "b"})
    assert saved == {"TPM_FAAS_TEST_A": "old", "TPM_FAAS_TEST_B": None}
    assert (os.environ["TPM_FAAS_TEST_A"], os.environ["TPM_FAAS_TEST_B"]) == ("new", "b")
    restore_process_env(saved)
    assert os.environ["TPM_FAAS_TEST_A"] == "old" and "TPM_FAAS_TEST_B" not in os.environ


def test_a_bare_policy_name_means_the_bundled_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_policy("byo.yaml") == POLICIES / "byo.yaml"
    assert resolve_policy("missing.yaml") == Path("missing.yaml")  # the policy loader says so
    (tmp_path / "byo.yaml").write_text("version: 1\n")  # a file here wins
    assert resolve_policy("byo.yaml") == Path("byo.yaml")
    assert resolve_policy(tmp_path / "x.yaml") == tmp_path / "x.yaml"


def test_a_home_override_is_what_the_defaults_derive_from(tmp_path: Path) -> None:
    from tpm_faas.config import BUNDLED_MODELS, Settings

    s = Settings.from_env({"TPM_FAAS_HOME": "/elsewhere"}, home=tmp_path)
    assert s.home == tmp_path and s.model_roots == (tmp_path / "models", BUNDLED_MODELS)
    assert s.ledger_url == f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    assert s.dev_tokens_path == tmp_path / "dev-tokens.yaml"
