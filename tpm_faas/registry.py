"""Where running shard groups can be found: one small JSON file per replica of a model.

Rank 0 of a shard group writes its entry when it is ready to serve, rewrites it as a
heartbeat every few seconds, and removes it when it stops; the mode functions read it to reach
the group. A model may have several replicas (``<model>.json``, ``<model>~<replica>.json``);
:meth:`Registry.lookup` picks one of those with a fresh heartbeat. Writes are atomic (write
then rename), so a reader never sees half an entry.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tpm_faas.errors import ShardGroupError, UnknownModel

#: Seconds between a serving group's heartbeats, and after which an entry counts as dead.
HEARTBEAT_S = 5.0
STALE_S = 30.0


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
    architecture: str = "llama"
    num_heads: int = 1
    head_dim: int = 1
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The version's directory on the site's filesystem, where the gateway reads the
    #: checkpoint's own tokenizer (``tokenizer`` ``hf``); empty for the byte tokenizer.
    tokenizer_dir: str = ""
    #: Whether the checkpoint ships a chat template (requests may send chat messages).
    chat: bool = False
    #: A mixture of experts' routing (:class:`tpm_faas.architectures.Moe`): routed experts
    #: per layer (0: a dense model), experts per token, its MoE layers, a shared expert.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_layers: list[int] = field(default_factory=list)
    shared_experts: bool = False
    #: Served from the version store: the sha256 of the version's manifest and when it was
    #: committed (ISO 8601); empty for a version served from a model root's plain directory.
    manifest_sha256: str = ""
    committed_at: str = ""
    #: sha256 of the version's ``extras.safetensors`` (its adapters' and heads' weights).
    extras_sha256: str = ""


@dataclass(frozen=True)
class GroupEntry:
    """A registered shard group: ``max(tp_size, ep_size)`` ranks (:attr:`size`), tensor
    parallel over all of them when ``tp_size > 1``, a mixture of experts' routed experts split
    over all of them when ``ep_size > 1``."""

    model: ModelInfo
    address: str
    tp_size: int
    pid: int
    host: str
    started_at: float
    versions: dict[str, str] = field(default_factory=dict)
    replica: str = ""
    heartbeat_at: float = 0.0
    ep_size: int = 1

    @property
    def size(self) -> int:
        """The group's ranks."""
        return max(self.tp_size, self.ep_size)

    def fresh(self, now: float | None = None) -> bool:
        """Whether the group's last heartbeat is recent (entries without one count as fresh)."""
        if self.heartbeat_at <= 0:
            return True
        return (now if now is not None else time.time()) - self.heartbeat_at < STALE_S

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

    def _path(self, model: str, replica: str = "") -> Path:
        return self.root / (f"{model}~{replica}.json" if replica else f"{model}.json")

    def register(self, entry: GroupEntry) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(entry.to_json())
        os.replace(tmp, self._path(entry.model.name, entry.replica))

    def unregister(self, model: str, *, address: str | None = None, replica: str = "") -> None:
        """Remove a replica's entry (only if it still names ``address``, when given)."""
        path = self._path(model, replica)
        try:
            if address is not None and GroupEntry.from_json(path.read_text()).address != address:
                return
            path.unlink()
        except FileNotFoundError:
            pass

    def entries(self, model: str) -> list[GroupEntry]:
        """Every registered replica of ``model`` (live or not)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in [self._path(model), *sorted(self.root.glob(f"{model}~*.json"))]:
            try:
                out.append(GroupEntry.from_json(p.read_text()))
            except (FileNotFoundError, ValueError, TypeError, KeyError):
                continue
        return out

    def lookup(self, model: str) -> GroupEntry:
        """A live replica serving ``model`` (chosen at random among those with a fresh
        heartbeat), :class:`UnknownModel` if none is registered, or
        :class:`ShardGroupError` if every registered replica has stopped beating."""
        entries = self.entries(model)
        if not entries:
            served = ", ".join(self.models()) or "none"
            raise UnknownModel(f"model {model} is not served here (served: {served})")
        live = [e for e in entries if e.fresh()]
        if not live:
            raise ShardGroupError(
                f"model {model}'s shard groups have sent no heartbeat for {STALE_S:.0f} s"
            )
        return random.choice(live)

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            {p.stem.split("~")[0] for p in self.root.glob("*.json") if not p.name.startswith(".")}
        )
