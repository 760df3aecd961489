"""A shard group serves a version from the store, and its results replay bit for bit.

fp32 on CPU: a query and an intervention asked ``reproducible`` are replayed through the
gateway after a newer version was committed and the group restarted, while other requests
share the group; both come back identical (the client's ``replay`` and ``tpm-faas replay``).
A result that is not what the version computes is reported where it first differs.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from _versions import BASE, descendant
from click.testing import CliRunner

from tpm_faas.cli import main
from tpm_faas.client import TPMClient, parse_reply
from tpm_faas.config import POLICIES, Settings
from tpm_faas.errors import RequestError
from tpm_faas.gateway.ledger import Ledger
from tpm_faas.gateway.pipeline import Gateway
from tpm_faas.launcher import ShardGroup
from tpm_faas.testing.embedded import DEV_USERS, write_dev_tokens
from tpm_faas.testing.transport import InProcessTransport
from tpm_faas.versions import store

pytestmark = pytest.mark.integration
SHM = Path("/dev/shm")

OPS: list[dict[str, Any]] = [
    {"op": "save", "site": "hook_resid_post", "layers": [1, 3]},
    {"op": "logit_lens", "layers": "*", "positions": [-1], "top_k": 3},
    {"op": "save", "site": "attn.hook_z", "layers": [2], "heads": [1, 4], "generation": True},
]


def _site(home: Path, s: Path) -> Settings:
    policy = yaml.safe_load((POLICIES / "local-dev.yaml").read_text())
    policy["models"] = {"lin@*": policy["models"]["demo-tpm@1"]}
    for g in policy["groups"]:
        g["models"] = ["lin@*"]
    home.mkdir(parents=True)
    (home / "policy.yaml").write_text(yaml.safe_dump(policy))
    env = {
        "TPM_FAAS_HOME": str(home),
        "TPM_FAAS_POLICY": str(home / "policy.yaml"),
        "TPM_FAAS_DEV_TOKENS": str(home / "tokens.yaml"),
        "TPM_FAAS_VERSION_STORE": str(s),
        "TPM_FAAS_MODELS": str(home / "models"),
        "TPM_FAAS_SITE": "replay-test",
    }
    settings = Settings.from_env(env)
    ledger = Ledger(settings.ledger_url)
    for user in DEV_USERS.values():
        ledger.credit(user.project, round(user.su * 1e6), reference=f"seed:{user.project}")
    ledger.close()
    return settings


def test_results_replay_bit_identically_after_new_versions_and_a_restart(tmp_path: Path) -> None:
    s = tmp_path / "store"
    store.commit(BASE, s, "lin@1")
    v2 = descendant(BASE, tmp_path / "v2", seed=2)
    store.commit(v2, s, "lin@2", parent="lin@1")
    settings = _site(tmp_path / "home", s)
    tokens = write_dev_tokens(tmp_path / "home" / "tokens.yaml")
    group = ShardGroup("lin@latest", 1, settings, tmp_path / "runs", max_batch=8, max_wait_ms=50)
    assert group.model == "lin@2"
    segments = set(SHM.glob("deepspeed_allreduce_buffer_*"))
    group.start()
    try:
        # The rank dropped its all-reduce segment's name once mapped: nothing left behind.
        assert set(SHM.glob("deepspeed_allreduce_buffer_*")) <= segments
        client = TPMClient(
            InProcessTransport(Gateway.from_settings(settings)),
            token=tokens["dev"],
            model="lin@latest",
        )
        prompts = ["In the beginning God created", "And the earth was"]
        q = client.generate(prompts, max_new_tokens=8, logprobs=True, reproducible=True)
        iv = client.intervene(prompts[:1], OPS, max_new_tokens=4, reproducible=True)
        manifest = store.load(s, "lin@2").manifest_sha256
        for r in (q, iv):
            assert r.receipt.model == "lin@2" and r.receipt.manifest_sha256 == manifest
            assert r.receipt.batch_invariant and r.receipt.site == "replay-test"
            assert r.receipt.dtype == "float32" and r.receipt.tp_size == 1
        assert iv.receipt.intervention_sha256

        # A newer version is committed (latest moves on) and the group restarts.
        store.commit(descendant(v2, tmp_path / "v3", seed=3), s, "lin@3", parent="lin@2")
        group.restart()

        # Other requests keep the group busy while the replays run.
        stop = threading.Event()
        noise_errors: list[BaseException] = []

        def noise() -> None:
            other = TPMClient(
                InProcessTransport(Gateway.from_settings(settings)),
                token=tokens["dev"],
                model="lin@2",
            )
            while not stop.is_set():
                try:
                    other.generate(["Noise, noise and", "x"], max_new_tokens=12)
                except BaseException as e:
                    noise_errors.append(e)
                    return

        threads = [threading.Thread(target=noise) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            reports = [client.replay(q), client.replay(iv)]
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not noise_errors
        for rep in reports:
            assert rep.identical, rep.summary()
            assert rep.model == "lin@2"
            assert set(rep.receipt_changes) <= {"versions"}

        # The command line: the saved reply and request.
        (tmp_path / "q.json").write_text(json.dumps(q.raw))
        assert q.request is not None
        (tmp_path / "req.json").write_text(json.dumps(q.request))
        run = CliRunner().invoke(
            main,
            ["replay", str(tmp_path / "q.json"), "--request", str(tmp_path / "req.json")],
            env={**settings.to_env(), "TPM_FAAS_TOKEN": tokens["dev"]},
        )
        assert run.exit_code == 0, run.output
        assert run.output.startswith("identical: ")

        # A request that is not the receipt's is refused; nothing is run.
        with pytest.raises(RequestError, match="not the one receipt"):
            client.replay(q, {**q.request, "max_new_tokens": 9})

        # A result that is not what lin@2 computes: reported where it first differs.
        forged = json.loads(json.dumps(iv.raw))
        forged["output"]["results"][0]["token_ids"][2] += 1
        again = client.replay(parse_reply(json.dumps(forged)), iv.request)
        assert not again.identical
        first = again.differences[0]
        assert (first.what, first.prompt, first.token_index) == ("generated tokens", 0, 2)
        (tmp_path / "iv.json").write_text(json.dumps(forged))
        (tmp_path / "ivreq.json").write_text(json.dumps(iv.request))
        run = CliRunner().invoke(
            main,
            ["replay", str(tmp_path / "iv.json"), "--request", str(tmp_path / "ivreq.json")],
            env={**settings.to_env(), "TPM_FAAS_TOKEN": tokens["dev"]},
        )
        assert run.exit_code == 1 and "differs: generated tokens, prompt 0, token 2" in run.output

        # The ledger names the concrete version each charge ran on; gc keeps it.
        ledger = Ledger(settings.ledger_url)
        assert ledger.charged_models() == {"lin@2"}
        ledger.close()
        run = CliRunner().invoke(
            main, ["models", "gc", "--keep-last", "1", "--dry-run", "--json"], env=settings.to_env()
        )
        assert run.exit_code == 0, run.output
        kept = json.loads(run.output)["kept"]
        assert "charged in the ledger" in kept["lin@2"]
        assert kept == {
            "lin@1": "base of lin@2",
            "lin@2": "charged in the ledger; served by a shard group",
            "lin@3": "newest of lin",
        }
    finally:
        group.stop()
