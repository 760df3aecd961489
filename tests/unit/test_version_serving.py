"""Serving from the version store: the cache (materialise once, verified, bounded, LRU,
never evicting what is served), NAME@latest and pinned versions at admission, reproducible
requests priced by the policy and decoded in batches of their own."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("zstandard")
pytest.importorskip("torch")

from _versions import BASE, descendant

from tpm_faas.client import TPMClient
from tpm_faas.config import POLICIES, Settings
from tpm_faas.errors import (
    ConfigError,
    RemoteError,
    UnknownModel,
    VersionError,
)
from tpm_faas.registry import GroupEntry, Registry
from tpm_faas.testing import FAKE_MODEL, fake_site
from tpm_faas.testing.transport import InProcessTransport
from tpm_faas.versions import cache, store


@pytest.fixture(autouse=True)
def _no_leases_left() -> Iterator[None]:
    """Each test's materialised versions are released after it (the groups stopped)."""
    yield
    cache.release_all()


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding lin@1 (the bundled demo model) and lin@2 (two tensors moved)."""
    root = tmp_path_factory.mktemp("lineage")
    s = root / "store"
    store.commit(BASE, s, "lin@1")
    store.commit(descendant(BASE, root / "v2", seed=2), s, "lin@2", parent="lin@1")
    return s


def _files(d: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in d.iterdir()
        if p.is_file() and p.name != "tpm_version.json"
    }


def test_materialise_once_verified_and_named(lineage: Path, tmp_path: Path) -> None:
    c = tmp_path / "cache"
    d = cache.materialise(lineage, "lin@1", c, max_bytes=10**9)
    assert d == c / "lin" / "1"
    assert _files(d) == _files(BASE)  # bit-identical to what was committed
    marker = json.loads((d / "tpm_version.json").read_text())
    assert marker["manifest_sha256"] == store.load(lineage, "lin@1").manifest_sha256
    before = (d / "model.safetensors").stat().st_ino
    assert cache.materialise(lineage, "lin@1", c, max_bytes=10**9) == d
    assert (d / "model.safetensors").stat().st_ino == before  # reused, not rebuilt
    from tpm_faas.catalog import model_info

    info = model_info("lin@1", d)
    assert info.manifest_sha256 == marker["manifest_sha256"]
    assert info.checkpoint_sha256 == model_info("demo-tpm@1", BASE).checkpoint_sha256


def test_cache_is_bounded_lru_and_keeps_what_is_served(lineage: Path, tmp_path: Path) -> None:
    c = tmp_path / "cache"
    one = store.load(lineage, "lin@1").full_bytes
    bound = int(one * 1.5)  # room for one version
    v1 = cache.materialise(lineage, "lin@1", c, max_bytes=bound)
    # Leased (a group is starting on it or serving it): never evicted.
    with pytest.raises(ConfigError, match=r"versions in use \(lin@1\)"):
        cache.materialise(lineage, "lin@2", c, max_bytes=bound)
    (c / ".tmp-left-by-a-killed-rebuild").mkdir()
    cache.release(v1)  # the group stopped
    v2 = cache.materialise(lineage, "lin@2", c, max_bytes=bound)
    assert [e.ref for e in cache.entries(c)] == ["lin@2"]  # lin@1 evicted
    assert not list(c.glob(".tmp-*")) and not list(c.glob("*/.gone-*"))
    cache.release(v2)
    with pytest.raises(ConfigError, match=r"versions in use \(lin@2\)"):
        cache.materialise(lineage, "lin@1", c, max_bytes=bound, protect={"lin@2"})
    assert [e.ref for e in cache.entries(c)] == ["lin@2"]
    with pytest.raises(ConfigError, match="TPM_FAAS_VERSION_CACHE_GB"):
        cache.materialise(lineage, "lin@1", tmp_path / "small", max_bytes=one // 2)


def test_corrupt_object_is_named_and_nothing_is_cached(lineage: Path, tmp_path: Path) -> None:
    import shutil

    s = tmp_path / "store"
    shutil.copytree(lineage, s)
    entry = max(store.load(s, "lin@2").tensors().values(), key=lambda t: t["encoding"]["nbytes"])
    obj = s / "objects" / entry["object"][:2] / entry["object"]
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    settings = Settings.from_env({}, home=tmp_path / "home", version_store=s, model_roots=())
    with pytest.raises(VersionError, match=entry["object"][:12]):
        cache.locate("lin@2", settings)
    c = settings.version_cache_dir
    assert not (c / "lin" / "2").exists() and not list(c.glob(".tmp-*"))


def test_locate_prefers_model_roots_then_store_and_resolves_latest(
    lineage: Path, tmp_path: Path
) -> None:
    settings = Settings.from_env({}, home=tmp_path, version_store=lineage)
    assert cache.locate("demo-tpm@1", settings) == BASE  # a model root's plain directory
    assert cache.concrete("lin@latest", settings) == "lin@2"
    assert cache.locate("lin@latest", settings) == settings.version_cache_dir / "lin" / "2"
    with pytest.raises(UnknownModel, match="lin@9"):
        cache.locate("lin@9", settings)
    with pytest.raises(UnknownModel, match="no committed version"):
        cache.concrete("other@latest", settings)


# --- admission: NAME@latest, pins, reproducible pricing ----------------------------------


def _policy(tmp_path: Path, models: list[str], reproducible: float = 1.0) -> Path:
    data = yaml.safe_load((POLICIES / "local-dev.yaml").read_text())
    rates = dict(data["models"]["demo-tpm@1"], reproducible=reproducible)
    data["models"] = {"demo-tpm@*": rates}
    for g in data["groups"]:
        g["models"] = models
    p = tmp_path / "policy.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _serve(home: Path, version: str, committed_at: str) -> None:
    info = dataclasses.replace(FAKE_MODEL, name=f"demo-tpm@{version}", committed_at=committed_at)
    Registry(Settings.from_env({}, home=home).registry_dir).register(
        GroupEntry(model=info, address="fake://", tp_size=1, pid=0, host="h", started_at=0.0)
    )


def _client(home: Path, policy: Path) -> TPMClient:
    gateway, tokens, _ = fake_site(home, policy, site="test-site")
    _serve(home, "2", "2026-11-02T00:00:00+00:00")
    _serve(home, "10", "2026-11-03T00:00:00+00:00")
    return TPMClient(InProcessTransport(gateway), token=tokens["dev"], model="demo-tpm@latest")


def test_latest_is_the_newest_served_version(tmp_path: Path) -> None:
    client = _client(tmp_path, _policy(tmp_path, ["demo-tpm@*"]))
    r = client.generate("In the beginning", max_new_tokens=2)
    assert r.receipt.model == "demo-tpm@10" and r.raw["model"] == "demo-tpm@10"
    assert r.receipt.site == "test-site" and r.receipt.batch_invariant is False
    assert r.request is not None and r.request["model"] == "demo-tpm@latest"


def test_a_pinned_group_gets_its_version_for_latest(tmp_path: Path) -> None:
    client = _client(tmp_path, _policy(tmp_path, ["demo-tpm@2"]))
    assert client.generate("In", max_new_tokens=1).receipt.model == "demo-tpm@2"
    with pytest.raises(RemoteError) as e:
        client.generate("In", max_new_tokens=1, model="demo-tpm@10")
    assert e.value.code == "policy_denied"


def test_latest_of_a_name_nobody_serves_is_unknown(tmp_path: Path) -> None:
    client = _client(tmp_path, _policy(tmp_path, ["demo-tpm@*"]))
    with pytest.raises(RemoteError) as e:
        client.generate("In", max_new_tokens=1, model="nothing@latest")
    assert e.value.code == "unknown_model"


def test_reproducible_requests_are_priced_by_the_policy_knob(tmp_path: Path) -> None:
    client = _client(tmp_path, _policy(tmp_path, ["demo-tpm@*"], reproducible=2.5))
    plain = client.generate("In the beginning", max_new_tokens=4, model="demo-tpm@2")
    again = client.generate(
        "In the beginning", max_new_tokens=4, model="demo-tpm@2", reproducible=True
    )
    assert again.receipt.batch_invariant is True
    assert (plain.usage.input_tokens, plain.usage.output_tokens) == (
        again.usage.input_tokens,
        again.usage.output_tokens,
    )
    assert again.usage.su == pytest.approx(plain.usage.su * 2.5, rel=2e-3)  # bytes differ a little
    assert again.usage.su_held == pytest.approx(plain.usage.su_held * 2.5, rel=2e-3)


# --- the scheduler: a reproducible request decodes in a batch of its own -----------------


def test_reproducible_sequences_decode_alone() -> None:
    import torch

    from tpm_faas.runtime.scheduler import Scheduler

    plans: list[dict[str, Any]] = []

    def run_plan(plan: dict[str, Any]) -> Any:
        plans.append(plan)
        rows = 1 if plan["op"] == "prefill" else len(plan["slots"])
        return torch.zeros(rows, 264)

    sched = Scheduler(run_plan, slots=8, max_len=64)
    body = {"prompt_ids": [[1, 2], [3]], "max_new_tokens": 4, "stop_at_eos": False}
    sched.submit("a", "a", body)
    sched.submit("b", "b", {**body, "reproducible": True})
    sched.submit("c", "c", body)
    done = []
    while sched.busy:
        done += sched.step()
    assert sorted(k for k, r in done if r["ok"]) == ["a", "b", "c"]
    decodes = [p["slots"] for p in plans if p["op"] == "decode"]
    assert decodes
    # b's two prompts were admitted 3rd and 4th (slots 2 and 3): each decodes alone.
    assert all(len(s) == 1 or not set(s) & {2, 3} for s in decodes)
    assert [2] in decodes and [3] in decodes and any(len(s) == 4 for s in decodes)


def test_policy_version_patterns_rates_and_pins() -> None:
    from tpm_faas.policy import Caller, Policy, allows_model

    assert allows_model(["m@*"], "m@7") and allows_model(["m@2"], "m@2")
    assert not allows_model(["m@2"], "m@3") and not allows_model(["m@*"], "mm@1")
    data = yaml.safe_load((POLICIES / "local-dev.yaml").read_text())
    base = data["models"]["demo-tpm@1"]
    data["models"] = {"m@*": base, "m@2": {**base, "per_request": 1.0}}
    for g in data["groups"]:
        g["models"] = ["m@*", "n@*"]
    p = Policy.parse(yaml.safe_dump(data).encode())
    dev = Caller("dev@localhost", "dev@localhost")
    assert p.decide(dev, mode="query", model="m@9").rates.per_request == base["per_request"]
    assert p.decide(dev, mode="query", model="m@2").rates.per_request == 1.0  # its own entry
    assert p.pinned() == {"m@2"}
    assert p.allowed_versions(dev, "query", ["m@2", "x@1", "m@3"]) == ["m@2", "m@3"]
    assert p.warnings() == ["no SU rates for n@* (requests will be refused)"]


def test_latest_is_never_a_committed_or_imported_version(tmp_path: Path) -> None:
    from tpm_faas.catalog import import_checkpoint

    with pytest.raises(VersionError, match="names the newest version"):
        store.commit(BASE, tmp_path / "store", "lin@latest")
    with pytest.raises(ConfigError, match="names the newest version"):
        import_checkpoint(BASE, "lin@latest", tmp_path / "models")


def test_a_version_already_rebuilt_is_the_base_of_the_next(lineage: Path, tmp_path: Path) -> None:
    """With lin@1 rebuilt in the cache, lin@2 decodes its deltas on those files: it rebuilds
    even when lin@1's own objects are gone from the store; a damaged base file is not used."""
    import shutil

    s = tmp_path / "store"
    shutil.copytree(lineage, s)
    c = tmp_path / "cache"
    v1 = cache.materialise(s, "lin@1", c, max_bytes=10**9)
    needed = {t["object"] for t in store.load(s, "lin@2").tensors().values()}
    for t in store.load(s, "lin@1").tensors().values():
        if t["object"] not in needed:
            (s / "objects" / t["object"][:2] / t["object"]).unlink()
    with pytest.raises(VersionError, match="missing"):
        store.export(s, "lin@2", tmp_path / "alone")
    v2 = cache.materialise(s, "lin@2", c, max_bytes=10**9)
    fresh = descendant(BASE, tmp_path / "v2", seed=2)
    assert _files(v2) == _files(fresh)  # bit-identical

    # A base file damaged since: its tensors are decoded from the store instead (here they
    # cannot be, so the export names what is missing rather than using bad bytes).
    from tpm_faas.runtime.model_store import read_header

    weights = v1 / "model.safetensors"
    moved = read_header(weights)["lm_head.weight"]  # a tensor lin@2 stores as a delta on it
    data = bytearray(weights.read_bytes())
    data[moved.begin + 7] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(VersionError, match="missing"):
        store.export(s, "lin@2", tmp_path / "again", known={"lin@1": v1})
