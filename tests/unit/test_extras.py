"""A missing optional dependency is one error naming the extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tpm_faas._extras import EXTRAS, require
from tpm_faas.errors import ConfigError, MissingExtra


def test_require_returns_the_module() -> None:
    import yaml

    assert require("yaml", "gateway") is yaml


def test_a_missing_module_names_its_extra() -> None:
    with pytest.raises(MissingExtra, match=r"pip install 'tpm-faas\[runtime\]'") as info:
        require("tpm_faas_no_such_module.sub", "runtime")
    err = info.value
    assert isinstance(err, ConfigError) and isinstance(err, ImportError)
    assert err.code == "missing_extra" and err.exit_code == 7
    assert err.name == "tpm_faas_no_such_module"


def test_unknown_extra_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown extra"):
        require("yaml", "gpu")


def test_extras_match_pyproject() -> None:
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) == set(declared)


def test_heavy_objects_say_which_extra_without_it(tmp_path: pytest.TempPathFactory) -> None:
    """Where the runtime, endpoint and launch pieces are built, a client-only install gets
    MissingExtra (simulated by blocking their imports in a fresh interpreter)."""
    probe = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        for name in ("torch", "deepspeed", "transformers", "parsl", "globus_compute_endpoint"):
            sys.modules[name] = None  # import raises ModuleNotFoundError, as if not installed
        from tpm_faas.errors import MissingExtra

        def extra(fn):
            try:
                fn()
            except MissingExtra as e:
                return str(e)
            return "no error"

        from tpm_faas.compute.templates import TEMPLATES, render
        from tpm_faas.launcher import Allocation
        print(extra(lambda: render(TEMPLATES / "byo" / "config.yaml.j2", {})))
        print(extra(lambda: __import__("tpm_faas.compute.local_endpoint")))
        print(extra(lambda: Allocation().parsl_provider(Path("/bin"))))
        from tpm_faas.runtime.prebuild import main
        print(extra(main))
        """
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()[-4:]
    for line, extra in zip(lines, ["endpoint", "endpoint", "launch", "runtime"], strict=True):
        assert f"pip install 'tpm-faas[{extra}]'" in line, line
