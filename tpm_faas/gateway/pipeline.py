"""The gateway pipeline every mode function runs:
parse → auth → policy → admit → rate → hold → shard → post.

The entry point of a worker is :func:`handle`. It never raises: the caller gets a JSON
document, either a result (with usage and a receipt) or an error record with a code. Nothing
is charged for a request that fails: its hold is voided, or never made.

The shard group is reached through one injected seam, :class:`Shards` (the ZeroMQ client of
rank 0 by default; :class:`tpm_faas.testing.FakeShard` in tests), so every layer and the
success path can be exercised without a model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import re
import time
import uuid
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

from pydantic import ValidationError

from tpm_faas.catalog import LATEST
from tpm_faas.config import Settings, settings_key, task_id
from tpm_faas.errors import (
    ConfigError,
    MalformedRequest,
    RequestError,
    ShardGroupError,
    TokenInvalid,
    TPMError,
    UnknownModel,
)
from tpm_faas.gateway import results
from tpm_faas.gateway.auth import (
    Authenticator,
    GlobusIntrospector,
    Introspector,
    LocalIntrospector,
    Principal,
)
from tpm_faas.gateway.ledger import UNAVAILABLE, Ledger, to_su, unavailable
from tpm_faas.gateway.ratelimit import RateLimiter
from tpm_faas.modes import Mode, get_mode
from tpm_faas.modes.base import sha256_json
from tpm_faas.modes.pricing import MAX_OWNER_JSON, MAX_RESULTS_DIR_URI
from tpm_faas.policy import Caller, Limits, Policy, PolicyStore, Usage
from tpm_faas.protocol import codec
from tpm_faas.protocol.replies import ErrorRecord, ErrorReply, Receipt, Reply
from tpm_faas.protocol.replies import Usage as UsageReply
from tpm_faas.protocol.requests import ResultTensor
from tpm_faas.registry import GroupEntry, Registry
from tpm_faas.shard_client import ShardClient

log = logging.getLogger(__name__)


class Shards(Protocol):
    """How the gateway reaches a shard group: one call, one JSON reply (or a TPMError)."""

    def call(
        self, group: GroupEntry, op: str, body: dict[str, Any], *, request_id: str
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ZmqShards:
    """The shard groups' rank 0 over ZeroMQ (:class:`tpm_faas.shard_client.ShardClient`)."""

    timeout_s: float = 300.0

    def call(
        self, group: GroupEntry, op: str, body: dict[str, Any], *, request_id: str
    ) -> dict[str, Any]:

        return ShardClient(group.address, timeout_s=self.timeout_s).call(
            op, body, request_id=request_id
        )


@dataclass
class Gateway:
    """The site services one worker uses, built once per process from :class:`Settings`."""

    settings: Settings
    authenticator: Authenticator
    policies: PolicyStore
    ledger: Ledger
    registry: Registry
    limiter: RateLimiter
    shards: Shards

    @property
    def policy(self) -> Policy:
        """The site policy now (reloaded when its file changes)."""
        return self.policies.current()

    @classmethod
    def from_settings(cls, settings: Settings, shards: Shards | None = None) -> Gateway:
        """The gateway of ``settings``; ``shards`` replaces the ZeroMQ seam (tests)."""
        introspector: Introspector
        if settings.auth_backend == "local":
            if settings.dev_tokens_path is None:
                raise ConfigError("local auth needs TPM_FAAS_DEV_TOKENS")
            introspector = LocalIntrospector(settings.dev_tokens_path)
        elif settings.auth_backend == "globus":
            if not settings.client_secret:
                raise ConfigError("globus auth needs TPM_FAAS_CLIENT_SECRET")
            introspector = GlobusIntrospector(
                settings.client_id, settings.client_secret, groups=settings.globus_groups
            )
        else:
            raise ConfigError(f"unknown TPM_FAAS_AUTH {settings.auth_backend!r} (local | globus)")
        uri = settings.results_dir.resolve().as_uri()
        if len(uri) > MAX_RESULTS_DIR_URI:  # admission prices by-reference results with it
            raise ConfigError(
                f"the results directory's URI is {len(uri)} characters; at most "
                f"{MAX_RESULTS_DIR_URI} (set TPM_FAAS_HOME to a shorter path)"
            )
        policies = PolicyStore(settings.policy_path)  # a bad policy fails before the ledger opens
        ledger = Ledger(settings.ledger_url)
        return cls(
            settings=settings,
            authenticator=Authenticator(
                introspector, settings.client_id, mapped_identity=settings.mapped_identity
            ),
            policies=policies,
            ledger=ledger,
            registry=Registry(settings.registry_dir),
            limiter=RateLimiter(ledger.engine),
            shards=shards or ZmqShards(settings.shard_timeout_s),
        )

    def handle(self, mode_name: str, request_json: str, token: str | None) -> dict[str, Any]:
        """Run one request through the pipeline; return the result or raise :class:`TPMError`."""
        mode = get_mode(mode_name)
        started = time.time()
        request = parse(mode.request_model, request_json)
        request_id = request.request_id or task_id() or str(uuid.uuid4())
        try:
            return self._admit_and_run(mode, request, request_id, token, started)
        except TPMError as e:
            e.request_id = request_id
            raise
        except UNAVAILABLE as e:  # the ledger's database (its rate buckets) did not answer
            err = unavailable(e, self.ledger.url)
            err.request_id = request_id
            raise err from e

    def _admit_and_run(
        self, mode: Mode, request: Any, request_id: str, token: str | None, started: float
    ) -> dict[str, Any]:
        principal = self.authenticator.require(token, mode.name)
        if len(json.dumps(principal.identity)) > MAX_OWNER_JSON:  # recorded in results files
            raise TokenInvalid("the access token's identity is longer than any Globus identity")
        policy = self.policy  # one policy for the whole request, even across a reload
        caller = Caller(
            principal.identity, principal.username, principal.identity_set, principal.groups
        )
        model = self._concrete(request.model, policy, caller, mode.name)
        if model != request.model:  # the reply, the ledger and the receipt name the version
            request = request.model_copy(update={"model": model})
        group = self.registry.lookup(request.model)
        decision = policy.decide(caller, mode=mode.name, model=request.model)
        limits = decision.limits
        admission = mode.admit(self._with_results(request, principal, limits), group.model, limits)
        held = decision.price_micro(admission.worst, reproducible=request.reproducible)
        worst_tokens = admission.worst.input_tokens + admission.worst.output_tokens
        reservation = self.limiter.admit(decision.group, principal.identity, limits, worst_tokens)
        used_tokens = 0
        try:
            self.ledger.hold(
                request_id,
                decision.project,
                held,
                ttl_s=policy.data.hold_ttl_s,
                mode=mode.name,
                identity=principal.identity,
                model=request.model,  # the concrete version: gc keeps what was charged
                max_open=limits.max_concurrent,
            )
        except BaseException:  # refused by the ledger (funds, concurrency, duplicate)
            _quietly(self.limiter.settle, reservation, 0, refused=True)
            raise
        try:
            output = self.shards.call(
                group, admission.shard_op, admission.body, request_id=request_id
            )
            # Serving figures (queue wait, time to first token, decode rate) go with the usage.
            timing = output.pop("timing", None)
            typed = _shard_output(mode, output)
            used = mode.usage(request, admission, typed)
            used = Usage(
                used.input_tokens,
                used.output_tokens,
                self._bytes_out(output, request_id, principal.identity),
                used.hooked_sites,
            )
            used_tokens = used.input_tokens + used.output_tokens
            charged = self.ledger.post(
                request_id, decision.price_micro(used, reproducible=request.reproducible)
            )
        except BaseException:
            _quietly(self.ledger.void, request_id)  # the original error is what the caller gets
            raise
        finally:
            # Bookkeeping after the charge must not lose a charged result (or hide an error).
            _quietly(self.limiter.settle, reservation, used_tokens)
        reply = Reply(
            request_id=request_id,
            mode=mode.name,
            model=request.model,
            output=output,
            usage=UsageReply(
                **asdict(used),
                su=to_su(charged),
                su_held=to_su(held),
                project=decision.project,
                seconds=round(time.time() - started, 4),
                timing=timing,
            ),
            receipt=Receipt(
                request_id=request_id,
                model=request.model,
                checkpoint_sha256=group.model.checkpoint_sha256,
                manifest_sha256=group.model.manifest_sha256 or None,
                extras_sha256=group.model.extras_sha256 or None,
                request_sha256=request_hash(request),
                seed=getattr(request, "seed", None),
                dtype=group.model.dtype,
                tp_size=group.tp_size,
                ep_size=group.ep_size,
                policy_sha256=decision.policy_sha256,
                versions={**gateway_versions(), **group.versions},
                site=self.settings.site,
                issued_at=time.time(),
                **mode.receipt_extras(request, admission),
            ),
        )
        return reply.model_dump(mode="json", exclude_none=True)

    def _concrete(self, model: str, policy: Policy, caller: Caller, mode: str) -> str:
        """``model``, with ``NAME@latest`` replaced by the newest version of ``NAME`` that a
        live shard group serves and the caller's policy allows for ``mode`` (a group pinned
        to a version gets that version)."""
        name, _, version = model.partition("@")
        if version != LATEST:
            return model
        served = {}
        for ref in self.registry.models():
            if ref.partition("@")[0] == name and ref.partition("@")[2] != LATEST:
                live = [e for e in self.registry.entries(ref) if e.fresh()]
                if live:
                    served[ref] = max((e.model.committed_at, e.started_at) for e in live)
        if not served:
            raise UnknownModel(f"no version of {name} is served here ({model} names none)")
        # As the store orders a lineage: by commit time, then version; then the later start.
        newest = sorted(
            served, key=lambda r: (served[r][0], _natural(r), served[r][1]), reverse=True
        )
        allowed = policy.allowed_versions(caller, mode, newest)
        if not allowed:
            policy.decide(caller, mode=mode, model=newest[0])  # raises, saying why
        return allowed[0] if allowed else newest[0]

    def _with_results(self, request: Any, principal: Principal, limits: Limits) -> Any:
        """``request`` with tensors named from the caller's earlier results read in (intervene's
        ``tensors`` table); the request itself (and its hash in the receipt) keeps the refs,
        whose sha256 pins the values."""
        tensors = getattr(request, "tensors", None)
        if not tensors or not any(isinstance(t, ResultTensor) for t in tensors.values()):
            return request
        owners = principal.identity_set | {principal.identity}
        read = results.resolve(tensors, self.settings.results_dir, owners, limits.max_input_bytes)
        return request.model_copy(update={"tensors": read})

    def _bytes_out(self, output: dict[str, Any], request_id: str, owner: str) -> int:
        """Bytes the caller gets: tensors counted raw (inline or in a results file), plus the
        rest of the JSON. Large tensors go to a file here (see :mod:`.results`), owned by
        ``owner``."""
        s = self.settings
        in_file = results.offload(
            output, request_id, s.results_dir, s.inline_limit_bytes, owner=owner
        )
        found = results.payloads(output)
        inline_b64 = sum(len(p.get("data", "")) for _, p in found)
        text = len(json.dumps(output, separators=(",", ":")))
        return text - inline_b64 + sum(codec.raw_size(p) for _, p in found) + in_file


def _shard_output(mode: Mode, output: dict[str, Any]) -> Any:
    """The shard group's output read through the mode's output model; a reply that does not
    fit it is the group's fault, not the caller's."""
    try:
        return mode.output_model.model_validate(output)
    except ValidationError as e:
        raise ShardGroupError(
            f"the shard group sent a {mode.name} output that does not fit "
            f"{mode.output_model.__name__}: {e.errors()[0]['msg']} at "
            f"{_loc(e.errors()[0]['loc'])}"
        ) from None


def _natural(ref: str) -> tuple[tuple[int, str], ...]:
    """A version's order among equals: ``v10`` after ``v9`` (numbers compare as numbers)."""
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", ref) if p)


def _quietly(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Run a clean-up step; log, never raise (an expired hold is voided later anyway)."""
    try:
        fn(*args, **kwargs)
    except Exception:
        log.exception("clean-up step %s failed", getattr(fn, "__name__", fn))


def parse(model: type[Any], request_json: str) -> Any:
    """Parse and validate a request; errors name the offending field.

    The JSON is read by pydantic's parser, which refuses nesting deeper than a few hundred
    levels (no request nests more than ten) instead of recursing until Python gives up.
    """
    if not isinstance(request_json, str):
        raise MalformedRequest(
            f"the request must be a JSON string, not {type(request_json).__name__}"
        )
    try:
        return model.model_validate_json(request_json)
    except ValidationError as e:
        errors = e.errors()
        if errors[0]["type"] == "json_invalid":
            raise MalformedRequest(f"the request is not valid JSON: {errors[0]['msg']}") from None
        if errors[0]["type"] == "model_type" and not errors[0]["loc"]:
            raise MalformedRequest("the request must be a JSON object") from None
        for err in errors:
            inner = (err.get("ctx") or {}).get("error")
            if isinstance(inner, TPMError):
                raise type(inner)(f"{_loc(err['loc'])}: {inner.message}") from None
        detail = "; ".join(f"{_loc(err['loc'])}: {err['msg']}" for err in errors)
        raise RequestError(f"invalid {model.__name__}: {detail}") from None


def _loc(loc: tuple[Any, ...]) -> str:
    # pydantic names validator steps ("function-after[...]") and union members ("add"): keep
    # the path a user wrote.
    return ".".join(str(p) for p in loc if "[" not in str(p)) or "request"


def request_hash(request: Any) -> str:
    """sha256 of the canonical JSON of a parsed request (without its request id)."""
    return sha256_json(request.model_dump(exclude={"request_id"}))


@lru_cache(maxsize=1)
def gateway_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("tpm-faas", "globus-compute-endpoint", "globus-sdk", "pydantic"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


@lru_cache(maxsize=4)
def _gateway_for(env_key: tuple[tuple[str, str], ...]) -> Gateway:
    return Gateway.from_settings(Settings.from_env(dict(env_key)))


def handle(mode_name: str, request_json: str, token: str | None) -> str:
    """Run one request in a worker and return JSON; never raises (errors become error records).

    The worker's gateway is built from its environment once and kept (per distinct settings).
    """
    try:
        gateway = _gateway_for(settings_key())
    except TPMError as e:
        return _error_json(e)
    except Exception as e:  # an unexpected failure: report it without a traceback
        log.exception("the gateway could not start")
        return _error_json(TPMError(f"internal error: {type(e).__name__}: {e}"))
    return respond(gateway, mode_name, request_json, token)


def respond(gateway: Gateway, mode_name: str, request_json: str, token: str | None) -> str:
    """Run one request through ``gateway`` and return the reply's JSON; never raises."""
    try:
        reply = gateway.handle(mode_name, request_json, token)
    except TPMError as e:
        log.info("request refused: %s", e)
        return _error_json(e)
    except Exception as e:  # an unexpected failure: report it without a traceback
        log.exception("request failed")
        return _error_json(TPMError(f"internal error: {type(e).__name__}: {e}"))
    return json.dumps(reply, separators=(",", ":"))


def _error_json(e: TPMError) -> str:
    return ErrorReply(error=ErrorRecord(**e.to_record())).model_dump_json()
