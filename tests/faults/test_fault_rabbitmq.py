"""RabbitMQ restarted under the Globus Compute SDK path.

The unmodified ``globus_compute_sdk.Executor`` against the loopback stand-in of the web
service, results through the real broker, tasks on the embedded site's real engine. The
broker's application is stopped and started again (``rabbitmqctl stop_app`` /
``start_app``) while a request is in flight: its caller gets its result or an error, never a
hang; the next request is served; the books balance.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from _services import broker_up
from click.testing import CliRunner

from faults._faults import assert_books_clean, wait_for
from tpm_faas.cli import main
from tpm_faas.client import TPMClient
from tpm_faas.compute.sdk import ExecutorTransport, Manifest, compute_client
from tpm_faas.errors import RemoteError
from tpm_faas.testing.embedded import EmbeddedSite
from tpm_faas.testing.loopback import LoopbackComputeService

#: pika never closes the sockets of the connections the broker restart broke; they have no peer
#: address (pyproject's filter for pika's socket pair does not match them) and the garbage
#: collector may meet them at any point after the restart, inside this module's code.
pytestmark = pytest.mark.filterwarnings(
    "ignore:unclosed <socket.socket fd=\\d+, family=2, type=1, proto=0, "
    "laddr=\\('127.0.0.1', \\d+\\)>:ResourceWarning"
)

#: The caller's own limit: a reply later than this is the hang the test forbids.
CALLER_TIMEOUT_S = 150.0


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def sdk(
    pg_site: EmbeddedSite, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TPMClient, Manifest]]:
    if not broker_up():
        pytest.skip("no RabbitMQ broker at 127.0.0.1:5672 (.ci/run starts one)")
    site = pg_site
    assert site.endpoint is not None
    with LoopbackComputeService() as svc:
        eid = svc.add_endpoint(site.endpoint)
        out = tmp_path_factory.mktemp("manifest") / "functions.json"
        res = CliRunner().invoke(
            main, ["register", "--local-services", "--endpoint", eid, "--out", str(out)]
        )
        assert res.exit_code == 0, res.output
        manifest = Manifest.load(out)
        svc.allow(eid, manifest.functions.values())
        with ExecutorTransport.from_manifest(manifest, compute_client(local_services=True)) as t:
            # retries=0: what one request sees, not the client's retries
            yield (
                TPMClient(t, token=site.tokens["dev"], timeout_s=CALLER_TIMEOUT_S, retries=0),
                manifest,
            )
    # pika never closes the sockets of the connections the restart broke (no peer address,
    # so pyproject's filter for its socket pair does not match them): collect them here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_a_broker_restart_never_leaves_the_caller_hanging(
    pg_site: EmbeddedSite, sdk: tuple[TPMClient, Manifest]
) -> None:
    sdk_client, manifest = sdk
    ledger = pg_site.ledger()
    assert sdk_client.generate("In the beginning", max_new_tokens=4).text  # warm

    outcome: dict[str, Any] = {}

    def call() -> None:
        t0 = time.monotonic()
        try:
            outcome["result"] = sdk_client.generate(
                [f"And Isaac said {j}" for j in range(8)], max_new_tokens=256
            )
        except BaseException as e:
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - t0

    caller = threading.Thread(target=call)
    caller.start()
    wait_for("the request's hold", lambda: ledger.open_holds("demo"), 60, 0.02)
    # Rank 0 is paused (SIGSTOP) for the outage so that the request is still running when
    # the broker comes back: the loopback stand-in of the web service publishes a result
    # only while the broker is up (the real service keeps results).
    rank0 = int(pg_site.group.client().ping()["memory"][0]["pid"])
    os.kill(rank0, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        _rabbitmqctl("stop_app")
        # A request sent while the broker is down: refused at submission, not left waiting.
        # (Another client: the SDK's Executor shuts itself down after a failed submission.)
        t1 = time.monotonic()
        with (
            ExecutorTransport.from_manifest(manifest, compute_client(local_services=True)) as t,
            pytest.raises(RemoteError) as refused,
        ):
            TPMClient(t, token=pg_site.tokens["dev"], retries=0).generate(
                "And it was so", max_new_tokens=4
            )
        print(
            f"\n[faults] RabbitMQ down: refused in {time.monotonic() - t1:.1f} s: {refused.value}"
        )
        assert time.monotonic() - t1 < 60
    finally:
        try:
            _rabbitmqctl("start_app")
        finally:
            os.kill(rank0, signal.SIGCONT)
    wait_for("the broker to listen again", broker_up, 60)
    print(f"[faults] RabbitMQ: down and up again in {time.monotonic() - t0:.1f} s")
    caller.join(CALLER_TIMEOUT_S + 30)
    assert not caller.is_alive(), "the caller hangs"
    if "error" in outcome:
        err = outcome["error"]
        assert not isinstance(err, TimeoutError), f"no reply within {CALLER_TIMEOUT_S} s"
        assert isinstance(err, RemoteError), repr(err)
        print(f"[faults] RabbitMQ: an error after {outcome['seconds']:.1f} s: {err}")
    else:
        print(f"[faults] RabbitMQ: the result after {outcome['seconds']:.1f} s")

    t0 = time.monotonic()
    assert sdk_client.generate("And it was so", max_new_tokens=4).text
    print(f"[faults] RabbitMQ: next request served in {time.monotonic() - t0:.1f} s")
    wait_for("no open hold", lambda: not ledger.open_holds(), 60)
    assert_books_clean(ledger)
    ledger.close()
