"""Model versions: the bytes each costs to store and the time to commit and restore it, against
the published schemes, all in one run (issue 15).

Lineages are trained here in bf16 with the project's own training code
(``scripts/train_chat_model.py``: its corpus, BPE tokenizer, chat batches, AdamW with warm-up
and cosine decay, float32 master weights, each version published as a bf16 safetensors
checkpoint in the Hugging Face layout):

* ``dense@1`` a Llama of the chat model's kind (8.1M parameters: width 320, 6 layers) trained
  from scratch; ``dense@2..4`` continual training, each a new run of a few hundred AdamW
  steps from the previous version at a realistic learning rate;
* ``last-layers@1`` from ``dense@4``, only the last block, the final norm and ``lm_head``
  train;
* ``high-lr@1`` from ``dense@4``, a fine-tune on the chat exercises at a higher learning rate;
* ``lora@1`` from ``dense@4``, LoRA of rank 8 on every ``q_proj`` and ``v_proj``, trained on
  the chat exercises and merged into the weights.

For every version (a delta against its parent), the bytes stored as a share of a full copy of
its weights (the safetensors files) by: a full copy; zstd of the files (level 3); byte grouping
+ zstd per tensor (ZipNN); tensor dedup (Git-Theta: an unchanged tensor costs nothing, a
changed one its raw bytes); tensor dedup + XOR against the parent + byte grouping + zstd (BitX,
ZipLLM's scheme); and the store (:func:`tpm_faas.versions.store.commit` with the previous
version as parent; what the manifest records per tensor). Every version is exported and
compared byte for byte with what was committed; the store's bytes for each tensor are checked
against the best per-tensor scheme. Commit and restore (``export``: reconstruct every tensor
and check every hash; ``verify`` alone beside it) are timed against copying and sha256-hashing
the plain files, each with the files it reads evicted from the page cache first
(``posix_fadvise``), best of ``--repeats``.

    python bench/versions.py [--quick] [--repeats 3] [--work DIR] [--out bench/out/versions.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from _common import record, write

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

#: safetensors dtypes the codec stores, by the codec's name.
CODEC_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F8_E4M3": "float8_e4m3fn"}
WORD = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "F8_E4M3": np.uint8}
SCHEMES = ("full", "zstd_files", "grouped_zstd", "tensor_dedup", "xor", "store")
#: The dense lineage's target: the store's bytes at most this share of XOR's.
DENSE_TARGET = 0.85
#: The restore time's aim, as a ratio to copying and hashing the plain files.
RESTORE_AIM = 2.0


@dataclass(frozen=True)
class Plan:
    """What is trained: the model's shape (overrides of ``chat_config``), the batches, and
    the steps and learning rate of each kind of version."""

    shape: dict[str, int]
    seq_len: int
    batch_size: int
    chat_rows: int
    base: tuple[int, float]
    dense: tuple[int, float]
    dense_children: int
    last_layers: tuple[int, float]
    high_lr: tuple[int, float]
    lora: tuple[int, float]
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")


FULL = Plan(
    shape={"hidden_size": 320, "intermediate_size": 864, "num_hidden_layers": 6},
    seq_len=64,
    batch_size=8,
    chat_rows=2,
    base=(300, 3e-3),
    dense=(200, 5e-4),
    dense_children=3,
    last_layers=(200, 1e-3),
    high_lr=(200, 3e-3),
    lora=(200, 2e-3),
)
QUICK = Plan(
    shape={
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    seq_len=32,
    batch_size=4,
    chat_rows=1,
    base=(10, 3e-3),
    dense=(6, 5e-4),
    dense_children=2,
    last_layers=(6, 1e-3),
    high_lr=(6, 3e-3),
    lora=(6, 2e-3),
)


# --- the lineages --------------------------------------------------------------------------


def train_lineages(plan: Plan, ckpts: Path) -> list[dict[str, Any]]:
    """Train every version of ``plan`` and save each as a bf16 checkpoint under ``ckpts``;
    returns the versions, parents first."""
    import torch
    from train_chat_model import (
        add_lora,
        chat_config,
        chat_corpus,
        merge_lora,
        save_checkpoint,
        train_more,
    )
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="tpm-versions-tok-"))
    out: list[dict[str, Any]] = []
    try:
        corpus = chat_corpus(work)
        model = LlamaForCausalLM(chat_config(corpus.ids, **plan.shape))  # type: ignore[no-untyped-call]
        n_params = sum(p.numel() for p in model.parameters())
        shape = {"seq_len": plan.seq_len, "batch_size": plan.batch_size}
        mixed = {**shape, "chat_rows": plan.chat_rows}
        chats = {**shape, "chat_rows": plan.batch_size - 1}  # fine-tunes: mostly chats

        def version(
            ref: str,
            parent: str | None,
            kind: str,
            run: tuple[int, float],
            seed: int,
            batches: dict[str, int],
            params: Any = None,
        ) -> None:
            """Train ``run`` = (steps, lr) on ``params`` (default all), publish as ``ref``."""
            t0 = time.perf_counter()
            steps, lr = run
            loss = train_more(
                model,
                corpus,
                steps=steps,
                lr=lr,
                seed=seed,
                params=params,
                log_every=max(1, steps),
                **batches,
            )
            if params is not None and kind.startswith("LoRA"):
                merge_lora(model)
            save_checkpoint(model, corpus, ckpts / ref)
            trained = n_params if params is None else sum(p.numel() for p in params)
            out.append(
                {
                    "ref": ref,
                    "lineage": ref.split("@")[0],
                    "parent": parent,
                    "kind": kind,
                    "steps": steps,
                    "lr": lr,
                    "parameters": n_params,
                    "trained_parameters": trained,
                    "loss": round(loss, 4),
                    "train_s": round(time.perf_counter() - t0, 1),
                }
            )
            print(f"  {ref}: {kind}, loss {loss:.3f}", flush=True)

        version("dense@1", None, "trained from scratch", plan.base, 0, mixed)
        last = plan.dense_children + 1
        for i in range(2, last + 1):
            version(f"dense@{i}", f"dense@{i - 1}", "continual training", plan.dense, i, mixed)
        base = f"dense@{last}"
        master = copy.deepcopy(model.state_dict())
        head = [
            *model.model.layers[-1].parameters(),
            *model.model.norm.parameters(),
            *model.lm_head.parameters(),
        ]
        kind = "last block + final norm + lm_head"
        version("last-layers@1", base, kind, plan.last_layers, 100, mixed, head)
        model.load_state_dict(master)
        kind = "fine-tune, higher learning rate"
        version("high-lr@1", base, kind, plan.high_lr, 200, chats)
        model.load_state_dict(master)
        lora = add_lora(model, rank=plan.lora_rank, targets=plan.lora_targets, seed=300)
        kind = f"LoRA r{plan.lora_rank} on {'+'.join(plan.lora_targets)}, merged"
        version("lora@1", base, kind, plan.lora, 300, chats, lora)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def lineages(plan: Plan, work: Path) -> list[dict[str, Any]]:
    """The trained versions under ``work/ckpt``: reused when ``work/lineage.json`` records the
    same plan (so a rerun measures without training again), else trained."""
    index = work / "lineage.json"
    want = json.loads(json.dumps(dataclasses.asdict(plan)))
    if index.is_file():
        saved = json.loads(index.read_text())
        present = all((work / "ckpt" / v["ref"]).is_dir() for v in saved["versions"])
        if saved.get("plan") == want and present:
            print(f"reusing the lineages in {work}", flush=True)
            return list(saved["versions"])
    shutil.rmtree(work / "ckpt", ignore_errors=True)
    print("training the lineages", flush=True)
    versions = train_lineages(plan, work / "ckpt")
    index.write_text(json.dumps({"plan": want, "versions": versions}, indent=2) + "\n")
    return versions


# --- sizes ---------------------------------------------------------------------------------


def _safetensors(path: Path) -> tuple[bytes, bytes, dict[str, tuple[str, list[int], int, int]]]:
    """The file's bytes, its header (length prefix included) and its tensors by name."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n])
    base = 8 + n
    tensors = {
        k: (
            str(v["dtype"]),
            list(v["shape"]),
            base + v["data_offsets"][0],
            base + v["data_offsets"][1],
        )
        for k, v in meta.items()
        if k != "__metadata__"
    }
    return raw, raw[:base], tensors


def _weights(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def sizes(child: Path, parent: Path | None, manifest: Any, pmanifest: Any) -> dict[str, Any]:
    """Bytes of every scheme for the weights of ``child`` (a delta against ``parent``), the
    store's from its manifest; the per-tensor check of the store against the best scheme."""
    import zstandard

    from tpm_faas.versions import codec

    z = zstandard.ZstdCompressor(level=codec.DEFAULT_LEVEL)
    entries = manifest.tensors()
    pentries = pmanifest.tensors() if pmanifest is not None else {}
    parent_tensors: dict[str, tuple[bytes, str, list[int], int, int]] = {}
    parent_headers: set[bytes] = set()
    for f in _weights(parent) if parent is not None else []:
        raw, header, table = _safetensors(f)
        parent_headers.add(header)
        parent_tensors.update({k: (raw, *v) for k, v in table.items()})
    total = dict.fromkeys(SCHEMES, 0)
    total["step"] = 0
    words = changed_words = tensors = changed_tensors = 0
    unchanged_store = violations = forced = 0
    encodings: dict[str, int] = {}
    k = int(manifest.data.get("keyframe_every", 0))
    for f in _weights(child):
        raw, header, table = _safetensors(f)
        total["full"] += len(raw)
        total["zstd_files"] += len(z.compress(raw))
        same_header = header in parent_headers
        hcost = 0 if same_header else len(header)
        total["grouped_zstd"] += len(header)
        for s in ("tensor_dedup", "xor", "step", "store"):
            total[s] += hcost
        for name, (dtype, shape, start, end) in table.items():
            data = raw[start:end]
            nbytes = len(data)
            tensors += 1
            word = WORD.get(dtype, np.uint8)
            w = np.frombuffer(data, dtype=word)
            p = parent_tensors.get(name)
            pw = None
            if p is not None and p[1] == dtype and p[2] == shape:
                pw = np.frombuffer(p[0][p[3] : p[4]], dtype=word)
            unchanged = pw is not None and p is not None and p[0][p[3] : p[4]] == data
            words += w.size
            changed_words += w.size if pw is None else int(np.count_nonzero(w != pw))
            cdtype = CODEC_DTYPES.get(dtype)
            if cdtype is None:
                grouped = nbytes
            else:
                grouped = codec.encode(w, None, cdtype, encoding="zstd").nbytes
            total["grouped_zstd"] += grouped
            dedup = 0 if unchanged else nbytes
            total["tensor_dedup"] += dedup
            if unchanged:
                xor = step = 0
            elif pw is None or cdtype is None:
                xor = step = grouped  # no parent to XOR against: grouping + zstd alone
            else:
                xor = codec.encode(w, pw, cdtype, encoding="xor").nbytes
                step = codec.encode(w, pw, cdtype, encoding="step").nbytes
            total["xor"] += xor
            total["step"] += step
            entry = entries[name]
            pentry = pentries.get(name)
            reused = pentry is not None and pentry["object"] == entry["object"]
            rec = entry.get("encoding")
            store = 0 if reused else (int(entry["size"]) if rec is None else int(rec["nbytes"]))
            total["store"] += store
            if not unchanged:
                changed_tensors += 1
                enc = "plain" if rec is None else str(rec["encoding"])
                encodings[enc] = encodings.get(enc, 0) + 1
            else:
                unchanged_store += store
            # A tensor whose parent ends a chain of K is a keyframe by design: only the
            # schemes without a parent compare.
            keyframe = not unchanged and pentry is not None and int(pentry["depth"]) + 1 >= k
            forced += keyframe
            if store > (min(nbytes, grouped) if keyframe else min(nbytes, grouped, dedup, xor)):
                violations += 1
    full = total["full"]
    return {
        "bytes": total,
        "share": {k: v / full for k, v in total.items()},
        "store_vs_xor": total["store"] / total["xor"] if total["xor"] else None,
        "words_changed_share": changed_words / words if words else 0.0,
        "tensors": tensors,
        "tensors_changed": changed_tensors,
        "unchanged_tensor_store_bytes": unchanged_store,
        "per_tensor_violations": violations,
        "keyframe_tensors": forced,
        "store_encodings": dict(sorted(encodings.items())),
        "manifest_stored_bytes": manifest.stored_bytes,
        "manifest_full_bytes": manifest.full_bytes,
    }


# --- times ---------------------------------------------------------------------------------


def _files(d: Path) -> Iterator[Path]:
    return (p for p in sorted(d.rglob("*")) if p.is_file())


def evict(*dirs: Path) -> None:
    """Write back everything and drop the files under ``dirs`` from the page cache."""
    os.sync()
    for d in dirs:
        for p in _files(d):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def copy_and_hash(src: Path, dest: Path) -> None:
    """The baseline: every file read once, sha256-hashed and written to ``dest``."""
    dest.mkdir(parents=True)
    for p in _files(src):
        data = p.read_bytes()
        hashlib.sha256(data).hexdigest()
        target = dest / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def same_files(a: Path, b: Path) -> bool:
    fa = {p.relative_to(a): p.read_bytes() for p in _files(a)}
    fb = {p.relative_to(b): p.read_bytes() for p in _files(b)}
    return fa == fb


def commit_times(
    versions: list[dict[str, Any]], ckpts: Path, scratch: Path, repeats: int, keyframe_every: int
) -> tuple[Path, dict[str, dict[str, float]]]:
    """Commit the whole lineage into ``repeats`` fresh stores, each commit beside the baseline
    on the same files; the first store is kept for the rest. Best of the repeats."""
    from tpm_faas.versions import store

    out: dict[str, dict[str, list[float]]] = {
        v["ref"]: {"commit": [], "baseline": []} for v in versions
    }
    kept = scratch / "store-0"
    for r in range(repeats):
        root = scratch / f"store-{r}"
        for v in versions:
            src = ckpts / v["ref"]
            dest = scratch / "copy"
            evict(src)
            out[v["ref"]]["baseline"].append(timed(partial(copy_and_hash, src, dest)))
            shutil.rmtree(dest)
            evict(src, *([root] if root.exists() else []))
            commit = partial(
                store.commit, src, root, v["ref"], parent=v["parent"], keyframe_every=keyframe_every
            )
            out[v["ref"]]["commit"].append(timed(commit))
        if r:
            shutil.rmtree(root)
    best = {ref: {k: min(ts) for k, ts in d.items()} for ref, d in out.items()}
    return kept, best


def restore_times(
    versions: list[dict[str, Any]], ckpts: Path, root: Path, scratch: Path, repeats: int
) -> dict[str, dict[str, Any]]:
    """Per version: the baseline, ``export`` (checked bit-identical to what was committed)
    and ``verify``, each from an evicted page cache, best of ``repeats``."""
    from tpm_faas.versions import store

    out: dict[str, dict[str, Any]] = {}
    for v in versions:
        ref, src = v["ref"], ckpts / v["ref"]
        times: dict[str, list[float]] = {"baseline": [], "export": [], "verify": [], "cached": []}
        # The serving cache's case: the parent is already rebuilt there (its plain files).
        known = {v["parent"]: ckpts / v["parent"]} if v["parent"] else {}
        exact = True
        problems: list[str] = []
        for r in range(repeats):
            dest = scratch / "restore"
            evict(src)
            times["baseline"].append(timed(partial(copy_and_hash, src, dest)))
            shutil.rmtree(dest)
            evict(root)
            times["export"].append(timed(partial(store.export, root, ref, dest)))
            if r == 0:
                exact = same_files(src, dest)
            shutil.rmtree(dest)
            evict(root)
            for d in known.values():
                evict(d)
            times["cached"].append(timed(partial(store.export, root, ref, dest, known=known)))
            if r == 0:
                exact = exact and same_files(src, dest)
            shutil.rmtree(dest)
            evict(root)
            t0 = time.perf_counter()
            problems = store.verify(root, ref)
            times["verify"].append(time.perf_counter() - t0)
        out[ref] = {k: min(ts) for k, ts in times.items()} | {
            "bit_exact": exact,
            "verify_problems": problems,
        }
    return out


# --- the run -------------------------------------------------------------------------------


def measure(plan: Plan, work: Path, repeats: int, keyframe_every: int) -> dict[str, Any]:
    from tpm_faas.versions import store

    t_start = time.perf_counter()
    versions = lineages(plan, work)
    t_trained = time.perf_counter()
    ckpts = work / "ckpt"
    scratch = Path(tempfile.mkdtemp(prefix="tpm-versions-", dir=work))
    try:
        print("committing", flush=True)
        root, commits = commit_times(versions, ckpts, scratch, repeats, keyframe_every)
        print("restoring", flush=True)
        restores = restore_times(versions, ckpts, root, scratch, repeats)
        print("measuring the schemes", flush=True)
        rows = []
        for v in versions:
            ref, parent = v["ref"], v["parent"]
            man = store.load(root, ref)
            pman = store.load(root, parent) if parent else None
            s = sizes(ckpts / ref, ckpts / parent if parent else None, man, pman)
            c, r = commits[ref], restores[ref]
            entry = next(e for e in store.log(root, v["lineage"]) if e.version == ref.split("@")[1])
            rows.append(
                {
                    **v,
                    **s,
                    "chain": entry.chain,
                    "log_stored_bytes": entry.stored_bytes,
                    "commit_s": c["commit"],
                    "commit_baseline_s": c["baseline"],
                    "commit_ratio": c["commit"] / c["baseline"],
                    "export_s": r["export"],
                    "verify_s": r["verify"],
                    "restore_baseline_s": r["baseline"],
                    "restore_ratio": r["export"] / r["baseline"],
                    "restore_cached_s": r["cached"],
                    "restore_cached_ratio": r["cached"] / r["baseline"],
                    "verify_ratio": r["verify"] / r["baseline"],
                    "bit_exact": r["bit_exact"],
                    "verify_problems": r["verify_problems"],
                }
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "rows": rows,
        "train_s": round(t_trained - t_start, 1),
        "measure_s": round(time.perf_counter() - t_trained, 1),
    }


def targets(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every target of the issue, with its figure and whether it is met."""
    deltas = [r for r in rows if r["parent"]]
    dense = [r for r in deltas if r["lineage"] == "dense"]
    dense_store = sum(r["bytes"]["store"] for r in dense)
    dense_xor = sum(r["bytes"]["xor"] for r in dense)
    worst_dense = max((r["store_vs_xor"] for r in dense), default=0.0)
    restore = max(r["restore_ratio"] for r in rows)
    cached = max(r["restore_cached_ratio"] for r in rows)
    return {
        "bit_exact": {
            "value": sum(not r["bit_exact"] or bool(r["verify_problems"]) for r in rows),
            "what": "versions not exported bit-identical or not verified",
            "met": all(r["bit_exact"] and not r["verify_problems"] for r in rows),
        },
        "never_larger": {
            "value": sum(r["per_tensor_violations"] for r in rows),
            "what": "tensors the store keeps in more bytes than the best per-tensor scheme",
            "met": all(r["per_tensor_violations"] == 0 for r in rows),
        },
        "dense_vs_xor": {
            "value": dense_store / dense_xor if dense_xor else None,
            "worst_version": worst_dense,
            "what": f"dense lineage, store bytes / XOR bytes (target <= {DENSE_TARGET})",
            "met": bool(dense) and worst_dense <= DENSE_TARGET,
        },
        "unchanged_free": {
            "value": sum(r["unchanged_tensor_store_bytes"] for r in rows),
            "what": "bytes stored for unchanged tensors",
            "met": all(r["unchanged_tensor_store_bytes"] == 0 for r in rows),
        },
        "restore": {
            "value": restore,
            "what": f"worst restore time / copy + sha256 (aim <= {RESTORE_AIM})",
            "met": restore <= RESTORE_AIM,
        },
        "restore_on_cached_parent": {
            "value": cached,
            "what": "worst restore time with the parent already rebuilt (the serving cache) / "
            f"copy + sha256 (aim <= {RESTORE_AIM})",
            "met": cached <= RESTORE_AIM,
        },
        "commit": {
            "value": max(r["commit_ratio"] for r in rows),
            "what": "worst commit time / copy + sha256 (no target)",
            "met": None,
        },
    }


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'version':<14} {'chain':>5} {'words chg':>9} {'tensors chg':>11} {'full':>5} "
        f"{'zstd':>6} {'group':>6} {'dedup':>6} {'XOR':>6} {'store':>6} {'st/XOR':>6} "
        f"{'restore x':>9} {'on parent x':>11} {'verify x':>8} {'commit x':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        sh = r["share"]
        delta = r["parent"] is not None
        svx = f"{r['store_vs_xor']:.3f}" if delta and r["store_vs_xor"] else "-"
        lines.append(
            f"{r['ref']:<14} {r['chain']:>5} {100 * r['words_changed_share']:>8.1f}% "
            f"{r['tensors_changed']:>5}/{r['tensors']:<5} {sh['full']:>5.2f} "
            f"{sh['zstd_files']:>6.3f} {sh['grouped_zstd']:>6.3f} {sh['tensor_dedup']:>6.3f} "
            f"{sh['xor']:>6.3f} {sh['store']:>6.3f} {svx:>6} {r['restore_ratio']:>9.2f} "
            f"{r['restore_cached_ratio']:>11.2f} {r['verify_ratio']:>8.2f} "
            f"{r['commit_ratio']:>8.2f}"
        )
    lines.append(
        "(shares of a full copy of the weights; XOR = tensor dedup + XOR + grouping + zstd; "
        "'x' = time / copy + sha256 of the plain files, same run, page cache evicted)"
    )
    for name, t in result["targets"].items():
        met = {True: "PASS", False: "FAIL", None: "info"}[t["met"]]
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"  [{met}] {name}: {shown}  ({t['what']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny model, a few steps (smoke run)")
    p.add_argument("--repeats", type=int, default=3, help="timings: best of this many")
    p.add_argument("--keyframe-every", type=int, default=None, help="the store's K")
    p.add_argument("--work", type=Path, help="keep the trained lineages here and reuse them")
    p.add_argument("--out", type=Path, default=Path("bench/out/versions.json"))
    a = p.parse_args(argv)
    from tpm_faas.versions import store

    plan = QUICK if a.quick else FULL
    k = a.keyframe_every or store.DEFAULT_KEYFRAME_EVERY
    t0 = time.perf_counter()
    if a.work is not None:
        a.work.mkdir(parents=True, exist_ok=True)
        result = measure(plan, a.work, a.repeats, k)
    else:
        with tempfile.TemporaryDirectory(prefix="tpm-versions-") as tmp:
            result = measure(plan, Path(tmp), a.repeats, k)
    result["targets"] = targets(result["rows"])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(table(result))
    fields = {
        "quick": a.quick,
        "plan": dataclasses.asdict(plan),
        "keyframe_every": k,
        "repeats": a.repeats,
        "library_versions": {d: version(d) for d in ("numpy", "zstandard", "safetensors")},
        **result,
    }
    write(record("versions", **fields), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
