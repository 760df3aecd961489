"""Transports that carry mode calls through Globus Compute machinery."""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tpm_faas.compute.local_endpoint import LocalEndpoint


class LocalEngineTransport:
    """Mode calls through an embedded :class:`LocalEndpoint` (the real engine, no cloud).

    The three mode functions are registered once, as the SDK would register them.
    """

    def __init__(self, endpoint: LocalEndpoint) -> None:
        from tpm_faas.functions import MODE_FUNCTIONS

        self.endpoint = endpoint
        self.function_ids = {
            mode: endpoint.register_function(fn) for mode, fn in MODE_FUNCTIONS.items()
        }

    def submit(self, mode: str, request_json: str, token: str | None) -> Future[str]:
        return self.endpoint.submit(self.function_ids[mode], request_json, token)
