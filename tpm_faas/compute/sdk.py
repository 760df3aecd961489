"""The mode functions through the real Globus Compute SDK: registration, manifest, Executor.

* :func:`register` registers the three mode functions (as source text) with the Compute web
  service and returns a :class:`Manifest`: the function ids per mode, the endpoints that serve
  them, the models, the tpm_faas version. Clients, site policies and endpoint templates read
  the manifest (``allowed_functions``).
* :class:`ExecutorTransport` carries :class:`tpm_faas.client.TPMClient` calls through
  ``globus_compute_sdk.Executor.submit_to_registered_function`` with JSON-only serialization
  (the endpoints admit nothing else).

``local_services=True`` points the SDK at the loopback stand-in
(:mod:`tpm_faas.testing.loopback`, ``http://localhost:5000``, no Globus Auth).

The client :func:`compute_client` builds bounds each HTTP request
(:func:`tpm_faas.globus_auth.short_timeouts`), so ``tpm-faas register`` without a network
fails in seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tpm_faas.errors import AuthError, ConfigError
from tpm_faas.modes import MODE_NAMES as MODES

CODE_SERIALIZER = "globus_compute_sdk.serialize.PureSourceTextInspect"
DATA_SERIALIZER = "globus_compute_sdk.serialize.JSONData"


def compute_client(*, local_services: bool = False, interactive: bool = True) -> Any:
    """A ``globus_compute_sdk.Client`` that sends code as source text and data as JSON, with
    short network timeouts; it checks the service's version before it is returned.

    :param local_services: the loopback stand-in on localhost:5000, with no Globus Auth
    :param interactive: whether a person can answer a login prompt; if not, and there is
        no stored login (nor ``GLOBUS_COMPUTE_CLIENT_ID``/``_SECRET``), :class:`AuthError`
    """
    import globus_sdk
    from globus_compute_sdk import Client
    from globus_compute_sdk.serialize import JSONData, PureSourceTextInspect

    from tpm_faas.globus_auth import short_timeouts

    kw: dict[str, Any] = {
        "code_serialization_strategy": PureSourceTextInspect(),
        "data_serialization_strategy": JSONData(),
        "do_version_check": False,  # below, once the timeouts are set
    }
    if local_services:
        client = Client(local_compute_services=True, authorizer=globus_sdk.NullAuthorizer(), **kw)
    else:
        client = Client(**kw)
    # The SDK builds these clients itself: setting their transports is the only way to bound
    # them (the web service's, and the app's login client that fetches and refreshes tokens).
    web = getattr(client, "_compute_web_client", None)
    short_timeouts(getattr(web, "v2", None), getattr(web, "v3", None))
    app = client.app
    if app is not None:
        short_timeouts(getattr(app, "_login_client", None))
        if not interactive and isinstance(app, globus_sdk.UserApp) and app.login_required():
            raise AuthError(
                "not logged in to Globus Compute, and no terminal to log in from: run "
                "`globus-compute-endpoint login` first, or set GLOBUS_COMPUTE_CLIENT_ID and "
                "GLOBUS_COMPUTE_CLIENT_SECRET"
            )
    client.version_check()
    return client


@dataclass
class Manifest:
    """What was registered where: read by clients, policies and endpoint templates."""

    functions: dict[str, str]
    endpoints: list[str]
    models: list[str]
    web_service: str
    tpm_faas_version: str = field(default_factory=lambda: version("tpm-faas"))
    created_at: float = field(default_factory=time.time)
    groups: dict[str, str] = field(default_factory=dict)
    serializers: list[str] = field(default_factory=lambda: [CODE_SERIALIZER, DATA_SERIALIZER])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            raw = json.loads(path.read_text())
            m = cls(**raw)
        except FileNotFoundError as e:
            raise ConfigError(f"function manifest {path} does not exist") from e
        except (ValueError, TypeError) as e:
            raise ConfigError(f"function manifest {path} is invalid: {e}") from e
        missing = set(MODES) - set(m.functions)
        if missing:
            raise ConfigError(f"function manifest {path} lacks {sorted(missing)}")
        return m


def register(
    client: Any,
    *,
    endpoints: Iterable[str],
    models: Iterable[str] = ("demo-tpm@1",),
    groups: Mapping[str, str] | None = None,
) -> Manifest:
    """Register the mode functions (each shared with ``groups[mode]``, if given)."""
    from tpm_faas.functions import MODE_FUNCTIONS

    groups = dict(groups or {})
    functions = {
        mode: str(client.register_function(fn, description=fn.__doc__, group=groups.get(mode)))
        for mode, fn in MODE_FUNCTIONS.items()
    }
    return Manifest(
        functions=functions,
        endpoints=[str(e) for e in endpoints],
        models=list(models),
        web_service=str(client.web_service_address),
        groups=groups,
    )


class ExecutorTransport:
    """Mode calls through ``Executor.submit_to_registered_function`` (JSON in, JSON out).

    :param endpoint_id: the endpoint to run on
    :param function_ids: the manifest's function id per mode
    :param client: a ``globus_compute_sdk.Client`` (see :func:`compute_client`)
    """

    def __init__(self, endpoint_id: str, function_ids: Mapping[str, str], client: Any) -> None:
        from globus_compute_sdk import Executor
        from globus_compute_sdk.serialize import ComputeSerializer, JSONData, PureSourceTextInspect

        self.endpoint_id = endpoint_id
        self.function_ids = dict(function_ids)
        self.executor = Executor(
            endpoint_id=endpoint_id,
            client=client,
            serializer=ComputeSerializer(
                strategy_code=PureSourceTextInspect(), strategy_data=JSONData()
            ),
            result_serializers=[JSONData()],
        )

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, client: Any, endpoint_id: str | None = None
    ) -> ExecutorTransport:
        return cls(endpoint_id or manifest.endpoints[0], manifest.functions, client)

    def submit(self, mode: str, request_json: str, token: str | None) -> Future[str]:
        fut: Future[str] = self.executor.submit_to_registered_function(
            self.function_ids[mode], args=(request_json, token)
        )
        return fut

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ExecutorTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
