"""`import tpm_faas` and `tpm-faas --help` stay light: no torch, deepspeed, parsl or Compute SDK.

The allowlist tests (as click's ``test_imports``) name every third-party module a client-only
install may load: a new import outside the list fails here, so the client stays installable
with ``pip install tpm-faas`` and nothing heavier.
"""

from __future__ import annotations

import json
import re
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


#: Third-party top-level modules that ``import tpm_faas`` / ``tpm_faas.client`` may load: the
#: client's own dependencies (pyproject's ``dependencies``) and theirs.
CLIENT_ALLOWED = frozenset(
    {
        "tpm_faas",
        "pydantic",
        "pydantic_core",
        "annotated_types",
        "typing_extensions",
        "typing_inspection",
        "numpy",
        "yaml",
        "_yaml",
        "safetensors",
        "click",
        # globus-sdk and what it imports
        "globus_sdk",
        "requests",
        "urllib3",
        "idna",
        "certifi",
        "charset_normalizer",
        "jwt",
        "cryptography",
        "_cffi_backend",
        "_openssl",
    }
)
#: Added by the Globus Compute SDK transport (globus-compute-sdk and its declared dependencies).
SDK_ALLOWED = CLIENT_ALLOWED | {
    "globus_compute_sdk",
    "globus_compute_common",
    "dill",
    "pika",
    "packaging",
    "tblib",
    "texttable",
    "rich",
    "colorama",
    "exceptiongroup",
}
#: Interpreter and installer internals that show up in ``sys.modules`` (not dependencies).
INTERNAL = re.compile(
    r"^(__main__|__mp_main__|__editable__.*|_distutils_hack|_sysconfigdata_.*|cython_runtime|"
    r"_cython_\d.*)$"
)

ALLOWLIST_PROBE = """
import json, sys
{body}
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} - set(sys.stdlib_module_names))))
"""


def _third_party_after(body: str) -> set[str]:
    run = subprocess.run(
        [sys.executable, "-c", ALLOWLIST_PROBE.format(body=body)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    return {m for m in loaded if not INTERNAL.match(m)}


def test_client_imports_only_allowed_modules() -> None:
    outside = _third_party_after("import tpm_faas, tpm_faas.client") - CLIENT_ALLOWED
    assert not outside, f"importing the client loads modules outside the allowlist: {outside}"


def test_sdk_transport_imports_only_allowed_modules() -> None:
    """The SDK transport and everything it builds an Executor from: client dependencies only."""
    body = (
        "import tpm_faas, tpm_faas.client\n"
        "from tpm_faas.compute.sdk import ExecutorTransport, Manifest, compute_client\n"
        "from globus_compute_sdk import Client, Executor\n"
        "from globus_compute_sdk.serialize import ComputeSerializer, JSONData, "
        "PureSourceTextInspect\n"
    )
    outside = _third_party_after(body) - SDK_ALLOWED
    assert not outside, f"the SDK transport loads modules outside the allowlist: {outside}"


def test_allowlist_probe_sees_heavy_imports() -> None:
    """The probe itself: a heavy import does show up (so the tests above can fail)."""
    assert "sqlalchemy" in _third_party_after("import sqlalchemy") - SDK_ALLOWED
