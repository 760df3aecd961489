"""Fuzzing the real embedded site: thousands of hostile requests, every reply checked.

The cases come from the strategies of ``tests/unit/test_fuzz_modes.py`` (hypothesis, seeded):
arbitrary JSON and text as the request, structure-aware mutations of valid requests of every
mode (tensors with broken base64, dtypes, shapes; ``tensors`` tables, ``{"ref"}`` and
``{"result"}`` references to real by-reference results of the caller and of another user),
arbitrary token arguments (``None``, non-strings, huge strings, other users', expired, mangled
tokens) and arbitrary mode arguments.

The first ``--real`` cases (default 2,000) go through the real embedded site
(:class:`tpm_faas.testing.EmbeddedSite`: the real ``GlobusComputeEngine`` worker, a real
``demo-tpm@1`` shard group, its own SQLite ledger): each mode function as registered, the task
packed as the SDK packs it. A case the client cannot even send (a mode with no registered
function, a token that is not JSON) runs through the same gateway pipeline in this process,
against the same ledger and shard group (``path`` = ``in-process`` in the table). The rest run
in process against the fake shard group of the unit tests (one at a time, so each refusal's
balances are compared before and after). On 2 shared cores a served request on the real site
takes 0.1-1.5 s, so 10,000 through it would take far longer than the ~10 minutes a run may
take; ``--real 10000`` does it where there is time.

Counted: replies by (mode, code); **internal errors** (a reply that is not JSON, not a
documented code, ``internal``, or a worker exception), **hangs** (no reply within
``--timeout``), **SU charged to refused requests** (ledger posts of request ids that got no
result, and holds left open) — all three must be 0 — and, for information, served requests
whose price exceeded their hold (a capped post: the admission estimate was not an upper bound).

    python bench/fuzz.py [--requests 10000] [--real 2000] [--concurrency 4] [--timeout 60]
                         [--seed 12] [--out bench/out/fuzz.json]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import record, write

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

from hypothesis import HealthCheck, Phase, given, seed, settings
from test_fuzz_modes import (
    MODEL,
    Case,
    cases,
    check_reply,
    fill_seeds,
    make_site,
    resolve_token,
    seed_results,
)

from tpm_faas.gateway.pipeline import Gateway, respond
from tpm_faas.modes import MODE_NAMES
from tpm_faas.policy import Policy, Usage
from tpm_faas.testing.embedded import DEV_USERS, EmbeddedSite


def generate(n: int, seed_value: int) -> list[Case]:
    """``n`` cases drawn from :func:`test_fuzz_modes.cases` (generation only, no shrinking)."""
    out: list[Case] = []

    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(seed_value)
    @given(cases())
    def collect(case: Case) -> None:
        out.append(case)

    collect()
    return out


def mode_label(mode: Any) -> str:
    return mode if isinstance(mode, str) and mode in MODE_NAMES else "(other)"


@dataclasses.dataclass
class Tally:
    """What the run saw."""

    counts: collections.Counter[tuple[str, str, str]] = dataclasses.field(
        default_factory=collections.Counter
    )
    internal: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    hangs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    ok_ids: set[str] = dataclasses.field(default_factory=set)
    ok_replies: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    refused_charged_micro: int = 0

    def add(self, case: Case, path: str, text: Any) -> None:
        mode = mode_label(case.mode)
        try:
            reply = check_reply(text)
        except (AssertionError, ValueError, TypeError, KeyError) as e:
            self.internal.append({"case": describe(case), "reply": str(text)[:500], "why": str(e)})
            self.counts[(mode, "INTERNAL", path)] += 1
            return
        if reply["ok"]:
            self.ok_ids.add(reply["request_id"])
            self.ok_replies.append(reply)
            self.counts[(mode, "ok", path)] += 1
        else:
            self.counts[(mode, reply["error"]["code"], path)] += 1

    def worker_error(self, case: Case, path: str, e: BaseException) -> None:
        self.internal.append({"case": describe(case), "why": f"{type(e).__name__}: {e}"[:500]})
        self.counts[(mode_label(case.mode), "INTERNAL", path)] += 1


def describe(case: Case) -> dict[str, Any]:
    return {
        "kind": case.kind,
        "mode": repr(case.mode)[:80],
        "body": repr(case.body)[:300],
        "token": repr(case.token)[:80],
    }


def capped_posts(replies: list[dict[str, Any]], policy: Policy) -> int:
    """Served requests whose reported usage prices above their hold (the post was capped)."""
    identity = {u.project: u.identity for u in DEV_USERS.values()}
    n = 0
    for r in replies:
        u = r["usage"]
        decision = policy.decide(identity[u["project"]], "", r["mode"], r["model"])
        price = decision.price_micro(
            Usage(u["input_tokens"], u["output_tokens"], u["bytes_returned"], u["hooked_sites"])
        )
        n += price > round(u["su_held"] * 1e6)
    return n


def run_embedded(
    all_cases: list[Case], concurrency: int, timeout: float, home: Path
) -> tuple[Tally, dict[str, Any]]:
    site = EmbeddedSite(home, tp_size=1)
    # Small inline limit: saves come back by reference, so {"result"} references name files.
    site.settings = dataclasses.replace(site.settings, inline_limit_bytes=2000)
    tally = Tally()
    with site.start():
        # The same site components in this process, for cases no client could send.
        local = Gateway.from_settings(site.settings)
        seeds = seed_results(local, site.tokens)
        ledger = site.ledger()
        books0 = {b.project: b for b in ledger.balances()}
        posted0 = {c["request_id"] for c in ledger.charges()}
        t0 = time.perf_counter()
        inflight: collections.deque[tuple[Case, concurrent.futures.Future[str], float]] = (
            collections.deque()
        )

        def drain(block_until: int) -> None:
            while len(inflight) > block_until:
                case, fut, started = inflight.popleft()
                left = max(timeout - (time.perf_counter() - started), 0.01)
                try:
                    text = fut.result(timeout=left)
                except concurrent.futures.TimeoutError:
                    tally.hangs.append(describe(case))
                    tally.counts[(mode_label(case.mode), "HANG", "engine")] += 1
                    continue
                except Exception as e:  # the function raised: it never should
                    tally.worker_error(case, "engine", e)
                    continue
                tally.add(case, "engine", text)

        for i, case in enumerate(all_cases):
            token = resolve_token(case.token, site.tokens)
            body = fill_seeds(case.body, seeds)
            fut: concurrent.futures.Future[str] | None = None
            if isinstance(case.mode, str) and case.mode in MODE_NAMES:
                try:
                    fut = site.transport.submit(case.mode, body, token)
                except Exception:  # not sendable (not JSON): the client refuses it
                    fut = None
            if fut is None:
                tally.add(case, "in-process", respond(local, case.mode, body, token))
            else:
                inflight.append((case, fut, time.perf_counter()))
                drain(concurrency - 1)
            if (i + 1) % 1000 == 0:
                print(f"  {i + 1} requests, {time.perf_counter() - t0:.0f} s", flush=True)
        drain(0)
        seconds = time.perf_counter() - t0
        # Let expired-hold sweeps and late posts settle, then read the books.
        time.sleep(1.0)
        charges = [c for c in ledger.charges() if c["request_id"] not in posted0]
        tally.refused_charged_micro = sum(
            int(c["charged"]) for c in charges if c["request_id"] not in tally.ok_ids
        )
        open_holds = ledger.open_holds()
        books1 = {b.project: b for b in ledger.balances()}
        charged_delta = sum(
            books1[p].charged - (books0[p].charged if p in books0 else 0) for p in books1
        )
        served_su = sum(round(r["usage"]["su"] * 1e6) for r in tally.ok_replies)
        books = {
            "seconds": seconds,
            "open_holds": len(open_holds),
            "open_holds_micro": sum(int(h["amount"]) for h in open_holds),
            "reconcile_ok": ledger.reconcile().ok,
            "charged_micro": charged_delta,
            "served_micro": served_su,
            "capped_posts": capped_posts(tally.ok_replies, local.policy),
        }
        ledger.close()
    return tally, books


def run_fake(all_cases: list[Case], home: Path) -> tuple[Tally, dict[str, Any]]:
    fs = make_site(home)
    tally = Tally()
    t0 = time.perf_counter()
    open_after = 0
    for case in all_cases:
        before = fs.books()
        text = respond(
            fs.gateway,
            case.mode,
            fill_seeds(case.body, fs.seeds),
            resolve_token(case.token, fs.tokens),
        )
        tally.add(case, "in-process", text)
        reply = json.loads(text) if isinstance(text, str) else {}
        if reply.get("ok") is False:
            after = fs.books()
            tally.refused_charged_micro += sum(after[p].charged - before[p].charged for p in before)
        open_after += len(fs.gateway.ledger.open_holds())
    books = {
        "seconds": time.perf_counter() - t0,
        "open_holds": open_after,
        "open_holds_micro": 0,
        "reconcile_ok": fs.gateway.ledger.reconcile().ok,
        "charged_micro": None,
        "served_micro": sum(round(r["usage"]["su"] * 1e6) for r in tally.ok_replies),
        "capped_posts": capped_posts(tally.ok_replies, fs.gateway.policy),
    }
    return tally, books


def table(result: dict[str, Any]) -> str:
    head = f"{'site':<9} {'mode':<10} {'code':<18} {'path':<11} {'requests':>9}"
    lines = [head, "-" * len(head)]
    for r in result["counts"]:
        lines.append(
            f"{r['site']:<9} {r['mode']:<10} {r['code']:<18} {r['path']:<11} {r['requests']:>9,}"
        )
    lines.append("-" * len(head))
    for name, s in result["sites"].items():
        lines += [
            f"{name}: {s['requests']:,} requests in {s['seconds']:.0f} s, {s['served']:,} served; "
            f"internal errors {s['internal_errors']}, hangs {s['hangs']}, "
            f"SU charged to refused {s['su_charged_to_refused']:.6f}, open holds "
            f"{s['open_holds']}, reconcile ok {s['reconcile_ok']}, capped posts "
            f"{s['capped_posts']}",
        ]
    t = result["summary"]
    lines += [
        f"total: {t['requests']:,} requests",
        f"internal errors: {t['internal_errors']}",
        f"hangs (no reply within {result['timeout_s']:.0f} s): {t['hangs']}",
        f"SU charged to refused requests: {t['su_charged_to_refused']:.6f}",
        f"posts capped at the hold (admission estimate below the price; not refused): "
        f"{t['capped_posts']} of {t['served']:,} served",
    ]
    return "\n".join(lines)


def summary(tally: Tally, books: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        "requests": n,
        "served": len(tally.ok_replies),
        "internal_errors": len(tally.internal),
        "hangs": len(tally.hangs),
        "su_charged_to_refused": (tally.refused_charged_micro + books["open_holds_micro"]) / 1e6,
        **books,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10_000, help="cases in all")
    p.add_argument(
        "--real",
        type=int,
        default=2_000,
        help="how many of them go through the real embedded site (the rest: the fake shard)",
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (embedded)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a hang")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--out", type=Path, default=Path("bench/out/fuzz.json"))
    a = p.parse_args(argv)
    # Workers are launched through this environment's executables.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    t0 = time.perf_counter()
    all_cases = generate(a.requests, a.seed)
    gen_s = time.perf_counter() - t0
    real = min(a.real, len(all_cases))
    print(f"generated {len(all_cases):,} cases in {gen_s:.0f} s", flush=True)
    runs: dict[str, tuple[Tally, dict[str, Any], int]] = {}
    with tempfile.TemporaryDirectory(prefix="tpm-fuzz-") as home:
        if real:
            print(f"embedded site: {real:,} requests", flush=True)
            tally, books = run_embedded(
                all_cases[:real], a.concurrency, a.timeout, Path(home) / "e"
            )
            runs["embedded"] = (tally, books, real)
        if len(all_cases) > real:
            print(f"fake shard, in process: {len(all_cases) - real:,} requests", flush=True)
            tally, books = run_fake(all_cases[real:], Path(home) / "f")
            runs["fake"] = (tally, books, len(all_cases) - real)
    sites = {name: summary(t, b, n) for name, (t, b, n) in runs.items()}
    total = {
        k: sum(s[k] for s in sites.values())
        for k in (
            "requests",
            "served",
            "internal_errors",
            "hangs",
            "su_charged_to_refused",
            "open_holds",
            "capped_posts",
        )
    }
    total["reconcile_ok"] = all(s["reconcile_ok"] for s in sites.values())
    result = record(
        "fuzz",
        model=MODEL,
        seed=a.seed,
        concurrency=a.concurrency,
        timeout_s=a.timeout,
        generation_s=gen_s,
        kinds=dict(collections.Counter(c.kind for c in all_cases)),
        counts=[
            {"site": name, "mode": m, "code": c, "path": path, "requests": n}
            for name, (t, _, _) in runs.items()
            for (m, c, path), n in sorted(t.counts.items())
        ],
        sites=sites,
        summary=total,
        internal=[i for t, _, _ in runs.values() for i in t.internal][:20],
        hang_cases=[h for t, _, _ in runs.values() for h in t.hangs][:20],
    )
    print(table(result))
    write(result, a.out)
    clean = (
        total["internal_errors"] == 0
        and total["hangs"] == 0
        and total["su_charged_to_refused"] == 0
        and total["open_holds"] == 0
        and total["reconcile_ok"]
    )
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
