"""The unmodified Globus Compute SDK end to end: ``Client.register_function`` and
``Executor.submit_to_registered_function`` against the loopback stand-in of the web service,
results through the real RabbitMQ broker, tasks on the site's real ``GlobusComputeEngine``,
then the gateway and the Parsl-launched shard group.

The SDK's local services live at the fixed port 5000 and the broker at 127.0.0.1:5672; the
tests skip, with the reason, only if the broker cannot be reached.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from _services import broker_up
from click.testing import CliRunner

from tpm_faas.cli import main
from tpm_faas.client import TPMClient
from tpm_faas.compute.sdk import ExecutorTransport, Manifest, compute_client
from tpm_faas.errors import RemoteError
from tpm_faas.testing.embedded import EmbeddedSite
from tpm_faas.testing.loopback import LoopbackComputeService

pytestmark = pytest.mark.integration

PROMPT = "And God said, Let there be"


@pytest.fixture(scope="module")
def service(site: EmbeddedSite) -> Iterator[tuple[LoopbackComputeService, str]]:
    if not broker_up():
        pytest.skip("no RabbitMQ broker at 127.0.0.1:5672 (.ci/run starts one)")
    assert site.endpoint is not None
    with LoopbackComputeService() as svc:
        yield svc, svc.add_endpoint(site.endpoint)


@pytest.fixture(scope="module")
def manifest(
    service: tuple[LoopbackComputeService, str], tmp_path_factory: pytest.TempPathFactory
) -> Manifest:
    svc, eid = service
    out = tmp_path_factory.mktemp("manifest") / "functions.json"
    res = CliRunner().invoke(
        main, ["register", "--local-services", "--endpoint", eid, "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    m = Manifest.load(out)
    svc.allow(eid, m.functions.values())  # the endpoint's allowed_functions
    return m


@pytest.fixture(scope="module")
def client(site: EmbeddedSite, manifest: Manifest) -> Iterator[TPMClient]:
    with ExecutorTransport.from_manifest(manifest, compute_client(local_services=True)) as t:
        yield TPMClient(t, token=site.tokens["dev"])


def test_register_writes_a_manifest(
    manifest: Manifest, service: tuple[LoopbackComputeService, str]
) -> None:
    svc, eid = service
    assert set(manifest.functions) == {"query", "embed", "intervene"}
    assert manifest.endpoints == [eid] and manifest.models == ["demo-tpm@1"]
    assert manifest.web_service == "http://localhost:5000"
    code = svc.functions[manifest.functions["query"]]["function_code"]
    assert "\nst\nquery:def query(" in code  # source text, never a pickle


def test_three_modes_through_the_sdk_executor(
    site: EmbeddedSite, client: TPMClient, service: tuple[LoopbackComputeService, str]
) -> None:
    q = client.generate(PROMPT, max_new_tokens=16)
    assert q.text == site.client("dev").generate(PROMPT, max_new_tokens=16).text
    assert q.usage["su"] > 0
    feats = np.random.default_rng(0).standard_normal((2, 4, 16)).astype(np.float32)
    e = client.embed(adapter="features-linear", adapter_input=feats, head="regression")
    assert e.tensor().shape == (2, 1)
    i = client.intervene(PROMPT, [{"op": "logit_lens", "top_k": 3}])
    assert len(i.logit_lens) == 4
    svc, _ = service
    assert ("POST", "/v2/batch_status") not in svc.requests  # results came over AMQP
    assert ("GET", "/v2/get_amqp_result_connection_url") in svc.requests


def test_remote_errors_keep_their_code_and_layer(client: TPMClient) -> None:
    with pytest.raises(RemoteError) as info:
        client.generate("x", max_new_tokens=100000)
    assert info.value.code == "bad_request" and info.value.remote_layer == "request"
    with pytest.raises(RemoteError) as info:
        client.intervene(PROMPT, [{"op": "save", "site": "blocks.9.hook_resid_post"}])
    assert info.value.code == "bad_request" and "4 layers" in info.value.message


def test_a_function_not_allowed_on_the_endpoint_is_refused(
    manifest: Manifest, service: tuple[LoopbackComputeService, str]
) -> None:
    from tpm_faas.functions import query

    gcc = compute_client(local_services=True)
    other = gcc.register_function(query)  # same code, but not in allowed_functions
    with (
        ExecutorTransport(service[1], {"query": other}, gcc) as t,
        pytest.raises(RemoteError) as info,
    ):
        TPMClient(t).generate("x", max_new_tokens=1)
    assert info.value.code == "task_failed" and "not allowed" in info.value.message


def test_a_hundred_requests_in_flight(site: EmbeddedSite, client: TPMClient) -> None:
    ledger = site.ledger()
    before = len(ledger.charges("demo"))
    prompts = [f"And on day {k}" for k in range(100)]
    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(lambda p: client.generate(p, max_new_tokens=4), prompts))
    assert all(len(r.output["completions"][0]["token_ids"]) == 4 for r in results)
    assert len({r.request_id for r in results}) == 100
    assert len(ledger.charges("demo")) - before == 100 and ledger.open_holds() == []
    ledger.close()


def test_manifest_errors_are_clear(tmp_path: Path) -> None:
    from tpm_faas.errors import ConfigError

    bad = tmp_path / "m.json"
    bad.write_text(
        json.dumps(
            {"functions": {"query": "x"}, "endpoints": [], "models": [], "web_service": "http://x"}
        )
    )
    with pytest.raises(ConfigError, match="lacks"):
        Manifest.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        Manifest.load(tmp_path / "none.json")


def test_federation_fails_over_with_the_same_request(
    site: EmbeddedSite, manifest: Manifest, service: tuple[LoopbackComputeService, str]
) -> None:
    """The first endpoint of the federation is unknown to the service (its tasks fail); the
    call fails over to the site's endpoint with the same request id and is charged once."""
    import uuid

    from tpm_faas.compute.federation import FederatedTransport

    gcc = compute_client(local_services=True)
    dead = ExecutorTransport(str(uuid.uuid4()), manifest.functions, gcc)
    live = ExecutorTransport(service[1], manifest.functions, gcc)
    fed = FederatedTransport({"dead": dead, "live": live}, cooldown_s=600)
    try:
        c = TPMClient(fed, token=site.tokens["dev"])
        r = c.generate(PROMPT, max_new_tokens=4)
        assert fed.stats["dead"].failures == 1 and "not found" in fed.stats["dead"].last_error
        assert fed.stats["live"].successes == 1 and fed.stats["live"].latency_s is not None
        assert fed.order() == ["live", "dead"]  # the failed endpoint sits out
        c.generate(PROMPT, max_new_tokens=4)
        assert fed.stats["dead"].failures == 1 and fed.stats["live"].successes == 2
        ledger = site.ledger()
        mine = [h for h in ledger.charges("demo") if h["request_id"] == r.request_id]
        assert len(mine) == 1 and mine[0]["charged"] == round(r.usage["su"] * 1e6)
        ledger.close()
    finally:
        dead.close()
        live.close()
