"""What every benchmark records: when, where, with which versions; and where it writes."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

DISTS = ("tpm-faas", "torch", "transformers", "deepspeed", "globus-compute-endpoint", "parsl")


def record(benchmark: str, **fields: Any) -> dict[str, Any]:
    """A result record: the benchmark's name, date, device and versions, then ``fields``."""
    return {
        "benchmark": benchmark,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": f"CPU: {platform.machine()}, {os.cpu_count()} cores",
        "versions": {"python": platform.python_version(), **{d: version(d) for d in DISTS}},
        **fields,
    }


def write(result: dict[str, Any], out: Path) -> None:
    """Write ``result`` as JSON to ``out`` and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
