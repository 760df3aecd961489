"""The registry of modes is the only list of modes: everything else derives from it."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tpm_faas.functions import MODE_FUNCTIONS
from tpm_faas.globus_auth import mode_scopes
from tpm_faas.modes import MODE_NAMES, MODES, by_shard_op, get_mode
from tpm_faas.modes.base import Mode
from tpm_faas.policy import Group, json_schema
from tpm_faas.protocol.replies import Record

PACKAGE = Path(__file__).resolve().parents[2] / "tpm_faas"


def test_every_mode_declares_the_contract() -> None:
    for name, mode in MODES.items():
        assert isinstance(mode, Mode) and mode.name == name
        assert mode.request_model.model_config.get("extra") == "forbid"
        assert issubclass(mode.output_model, Record)
        assert mode.shard_body.model_config.get("extra") == "forbid"
        assert by_shard_op(mode.shard_op) is mode
        assert mode.summary and mode.scope_title and mode.scope_description


def test_each_function_is_its_modes_and_travels_as_source() -> None:
    assert list(MODE_FUNCTIONS) == list(MODE_NAMES)
    for name, fn in MODE_FUNCTIONS.items():
        assert fn.__name__ == name and fn is MODES[name].function
        # Registered as source text (PureSourceTextInspect): a top-level def of its module.
        source = inspect.getsource(fn)
        assert source.startswith(f"def {name}(") and f'handle("{name}"' in source


def test_scopes_policy_and_lookup_derive_from_the_registry() -> None:
    assert mode_scopes("rs") == [f"https://auth.globus.org/scopes/rs/{m}" for m in MODE_NAMES]
    schema = json.loads(json_schema())
    assert schema["$defs"]["Group"]["properties"]["modes"]["items"]["enum"] == list(MODE_NAMES)
    with pytest.raises(ValidationError, match="unknown mode 'train'"):
        Group.model_validate(
            {"name": "g", "match": {}, "modes": ["train"], "models": [], "allocation": "p"}
        )
    with pytest.raises(ValueError, match="one of query, embed, intervene"):
        get_mode("train")


def _literal_lists_of_modes(tree: ast.AST) -> list[int]:
    """Lines of list/tuple/set/dict literals that spell out two or more mode names."""
    lines = []
    for node in ast.walk(tree):
        items: list[ast.expr | None] = []
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            items = list(node.elts)
        elif isinstance(node, ast.Dict):
            items = list(node.keys)
        names = {i.value for i in items if isinstance(i, ast.Constant)} & set(MODE_NAMES)
        if len(names) >= 2:
            lines.append(node.lineno)
    return lines


def test_no_other_module_spells_out_the_modes() -> None:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        # Literal[...] types count too: subscripts hold a tuple of constants.
        lines = _literal_lists_of_modes(tree)
        if lines:
            found[str(path.relative_to(PACKAGE))] = lines
    assert found == {}, f"mode names spelled out outside the registry: {found}"


def test_importing_the_modes_loads_no_gateway_or_runtime() -> None:
    code = (
        "import sys, tpm_faas.modes\n"
        "bad = [m for m in ('sqlalchemy', 'zmq', 'torch', 'tpm_faas.gateway.pipeline',"
        " 'tpm_faas.gateway.ledger') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
