"""What the whole path costs on top of the shard group, per mode, in the same run.

For each mode, the same request is timed two ways against one warm shard group:

* **direct**: the admitted body sent straight to rank 0 over ZeroMQ (the baseline: model time
  plus one loopback hop);
* **full path**: ``TPMClient`` → task packed as the Globus Compute SDK packs it → the real
  ``GlobusComputeEngine`` worker → parse, auth, policy, ledger hold → the shard group → ledger
  post → result JSON with usage and receipt.

The ratio full/direct is the figure; the difference is the gateway's and the engine's
overhead per request. Prints a table and writes JSON (``--out``).

    python bench/gateway_overhead.py [--repeats 20] [--tp 1] [--out bench/out/gateway.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import record, write

from tpm_faas.client import TPMClient, encode_array
from tpm_faas.gateway.pipeline import parse
from tpm_faas.modes import MODES
from tpm_faas.policy import Policy
from tpm_faas.registry import Registry
from tpm_faas.shard_client import ShardClient
from tpm_faas.testing.embedded import EmbeddedSite

PROMPT = "And God said, Let there be"


def requests() -> dict[str, dict[str, Any]]:
    """One representative request per mode (JSON bodies, without ``model``)."""
    feats = np.random.default_rng(0).standard_normal((4, 8, 16)).astype(np.float32)
    return {
        "query (16 new tokens)": {
            "mode": "query",
            "body": {"prompts": [PROMPT], "max_new_tokens": 16},
        },
        "embed (adapter + head)": {
            "mode": "embed",
            "body": {
                "adapter": "features-linear",
                "adapter_input": encode_array(feats),
                "head": "regression",
            },
        },
        "intervene (lens + save)": {
            "mode": "intervene",
            "body": {
                "prompt": PROMPT,
                "ops": [
                    {"op": "logit_lens", "layers": "*", "positions": [-1], "top_k": 5},
                    {"op": "save", "site": "hook_resid_post", "layers": [1, 3], "positions": [-1]},
                ],
            },
        },
    }


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run(repeats: int, tp_size: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tpm-bench-") as home:
        site = EmbeddedSite(Path(home), tp_size=tp_size)
        with site.start():
            client: TPMClient = site.client("dev")
            entry = Registry(site.settings.registry_dir).lookup(site.model)
            shard = ShardClient(entry.address)
            limits = (
                Policy.load(site.settings.policy_path)
                .decide("dev@localhost", "dev@localhost", "query", site.model)
                .limits
            )
            rows = []
            for label, spec in requests().items():
                mode = MODES[spec["mode"]]
                request_json = json.dumps({"model": site.model, **spec["body"]})
                admitted = mode.admit(parse(mode.request_model, request_json), entry.model, limits)

                def direct(a: Any = admitted) -> object:
                    return shard.call(a.shard_op, a.body)

                def full(m: str = spec["mode"], b: dict[str, Any] = spec["body"]) -> object:
                    return client.call(m, b)

                d = timed(direct, repeats)
                f = timed(full, repeats)
                rows.append(
                    {
                        "request": label,
                        "direct_ms_median": 1e3 * statistics.median(d),
                        "full_ms_median": 1e3 * statistics.median(f),
                        "overhead_ms": 1e3 * (statistics.median(f) - statistics.median(d)),
                        "ratio_full_to_direct": statistics.median(f) / statistics.median(d),
                    }
                )
    return record("gateway_overhead", tp_size=tp_size, repeats=repeats, rows=rows)


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'request':<26} {'direct ms':>10} {'full path ms':>13} {'overhead ms':>12} "
        f"{'full/direct':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['request']:<26} {r['direct_ms_median']:>10.1f} {r['full_ms_median']:>13.1f} "
            f"{r['overhead_ms']:>12.1f} {r['ratio_full_to_direct']:>12.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/out/gateway_overhead.json"))
    a = p.parse_args(argv)
    # Workers are launched through this environment's executables.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    result = run(a.repeats, a.tp)
    print(table(result))
    write(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
