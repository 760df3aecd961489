"""The mode functions called in this process: a :class:`~tpm_faas.client.Transport` for tests
and notebooks that need no engine, no worker and no Globus Compute."""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tpm_faas.gateway.pipeline import Gateway


class InProcessTransport:
    """Runs each call through ``gateway`` (e.g. from :func:`tpm_faas.testing.shard.fake_site`)
    in the caller's thread, exactly as a worker would: JSON in, JSON out, errors as records."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def submit(self, mode: str, request_json: str, token: str | None) -> Future[str]:
        from tpm_faas.gateway.pipeline import respond

        fut: Future[str] = Future()
        fut.set_result(respond(self.gateway, mode, request_json, token))
        return fut
