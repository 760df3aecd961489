"""Where a running shard group can be found: one small JSON file per ``model@version``.

Rank 0 of a shard group writes its entry when it is ready to serve and removes it when it
stops; the mode functions read it to reach the group. Writes are atomic (write then rename),
so a reader never sees half an entry.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tpm_faas.errors import UnknownModel


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway needs to know of a served model to validate and price requests."""

    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    max_positions: int
    tokenizer: str
    checkpoint_sha256: str
    dtype: str
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupEntry:
    """A registered shard group."""

    model: ModelInfo
    address: str
    tp_size: int
    pid: int
    host: str
    started_at: float
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GroupEntry:
        raw = json.loads(text)
        return cls(**{**raw, "model": ModelInfo(**raw["model"])})


class Registry:
    """The registry directory of one site."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, model: str) -> Path:
        return self.root / f"{model}.json"

    def register(self, entry: GroupEntry) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(entry.to_json())
        os.replace(tmp, self._path(entry.model.name))

    def unregister(self, model: str, *, address: str | None = None) -> None:
        """Remove ``model``'s entry (only if it still names ``address``, when given)."""
        path = self._path(model)
        try:
            if address is not None and GroupEntry.from_json(path.read_text()).address != address:
                return
            path.unlink()
        except FileNotFoundError:
            pass

    def lookup(self, model: str) -> GroupEntry:
        """The group serving ``model``, or :class:`UnknownModel`."""
        try:
            return GroupEntry.from_json(self._path(model).read_text())
        except FileNotFoundError:
            served = ", ".join(self.models()) or "none"
            raise UnknownModel(f"model {model} is not served here (served: {served})") from None

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if not p.name.startswith("."))
