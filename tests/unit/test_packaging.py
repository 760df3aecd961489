"""What ``pip install tpm-faas`` brings: the client's requirements only, and the package data.

The wheel is built here from the source (``pip wheel --no-deps --no-build-isolation``, a few
seconds, no network) and read as pip would read it: its ``METADATA`` and its file list.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from importlib.resources import files
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tpm_faas._extras import HEAVY

ROOT = Path(__file__).resolve().parents[2]
#: What a client-only install must never pull in.
#: The client's requirements (docs/install.md), nothing more.
CLIENT = {
    "numpy",
    "pydantic",
    "safetensors",
    "globus-sdk",
    "globus-compute-sdk",
    "click",
    "pyyaml",
    "tenacity",
}


def _names_without_extras(requires: list[str]) -> set[str]:
    """Distribution names of the requirements that apply without any extra."""
    names = set()
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # only under an extra (or another platform)
        names.add(req.name.lower().replace("_", "-"))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    # Only what the build reads: a build in the checkout would leave build/ behind.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "tpm_faas", src / "tpm_faas", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    run = subprocess.run(
        [*pip, str(src), "-w", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    (whl,) = out.glob("tpm_faas-*.whl")
    return whl


def _wheel_metadata(whl: Path) -> dict[str, list[str]]:
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        msg = Parser().parsestr(z.read(name).decode())
    return {key: msg.get_all(key) or [] for key in ("Requires-Dist", "Requires-Python")}


def test_wheel_requires_only_the_client_without_extras(wheel: Path) -> None:
    meta = _wheel_metadata(wheel)
    names = _names_without_extras(meta["Requires-Dist"])
    assert not names & HEAVY, f"a plain install pulls {sorted(names & HEAVY)}"
    assert names == CLIENT
    # Every heavy package is still reachable through an extra.
    all_names = {Requirement(r).name.lower() for r in meta["Requires-Dist"]}
    assert all_names >= HEAVY
    assert meta["Requires-Python"] == [">=3.11"]  # no upper cap


def test_installed_metadata_requires_only_the_client() -> None:
    """The metadata of this environment's install agrees (a stale install fails here too)."""
    requires = importlib.metadata.requires("tpm-faas") or []
    names = _names_without_extras(requires)
    assert not names & HEAVY, f"a plain install pulls {sorted(names & HEAVY)}"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert names == _names_without_extras(declared), "reinstall: make venv"


def test_wheel_ships_policies_templates_and_the_demo_model(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        shipped = set(z.namelist())
    data = ROOT / "tpm_faas" / "data"
    for sub in ("policies", "endpoint_templates", "models"):
        expected = {
            f"tpm_faas/data/{p.relative_to(data).as_posix()}"
            for p in (data / sub).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
        assert expected, sub
        assert expected <= shipped, sorted(expected - shipped)
    for must in (
        "tpm_faas/data/policies/local-dev.yaml",
        "tpm_faas/data/policies/schema.json",
        "tpm_faas/data/endpoint_templates/byo/config.yaml.j2",
        "tpm_faas/data/endpoint_templates/provider/user_config_template.yaml.j2",
        "tpm_faas/data/models/demo-tpm/1/model.safetensors",
    ):
        assert must in shipped, must
    # The demo model's training script stays in the source tree.
    assert not {n for n in shipped if "demo_model" in n or n.startswith("scripts/")}


def test_package_data_is_found_through_importlib_resources() -> None:
    from tpm_faas.compute.templates import TEMPLATES
    from tpm_faas.config import BUNDLED_MODELS, POLICIES, Settings

    data = files("tpm_faas") / "data"
    assert Path(str(data / "policies")) == POLICIES
    assert Path(str(data / "endpoint_templates")) == TEMPLATES
    assert Path(str(data / "models")) == BUNDLED_MODELS
    assert Settings.from_env({}).policy_path == POLICIES / "local-dev.yaml"
    assert (TEMPLATES / "byo" / "config.yaml.j2").is_file()
