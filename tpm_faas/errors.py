"""The one exception tree of tpm_faas.

Every error a user can see carries a stable ``code`` (a short snake_case string that
clients and tests match on) and, for the CLI, an ``exit_code``::

    TPMError                                            code               exit
    ├── RequestError(TPMError, ValueError)              bad_request        2
    │   ├── MalformedRequest                            malformed_json
    │   ├── UnknownModel                                unknown_model
    │   ├── LimitExceeded                               limit_exceeded
    │   │   └── RateLimited                             rate_limited
    │   ├── TensorError                                 bad_tensor
    │   └── UnknownResult                               unknown_result
    ├── AuthError(TPMError, PermissionError)            unauthorized       3
    │   ├── TokenMissing                                token_missing
    │   ├── TokenInvalid                                token_invalid
    │   ├── TokenExpired                                token_expired
    │   └── ScopeMissing                                scope_missing
    ├── PolicyDenied(TPMError, PermissionError)         policy_denied      4
    ├── LedgerError                                     ledger_error       5
    │   ├── InsufficientFunds                           insufficient_su
    │   └── DuplicateRequest                            duplicate_request
    ├── ShardGroupError(TPMError, RuntimeError)         shard_unavailable  6
    │   └── ShardTimeout(ShardGroupError, TimeoutError) shard_timeout
    ├── ConfigError                                     config_error       7
    │   ├── MissingExtra(ConfigError, ImportError)      missing_extra
    │   ├── UnsupportedArchitecture                     unsupported_architecture
    │   └── VersionError                                version_error
    ├── RemoteError                                     (the remote code)  8
    │   └── TaskTimeout(RemoteError, TimeoutError)      client_timeout
    └── ServiceUnreachable(TPMError, ConnectionError)   service_unreachable 9

A class's exit code is its parent's unless drawn; ``tests/unit/test_errors.py`` checks this
drawing against the classes (names, parents, bases, codes, exit codes).

Errors cross the Globus Compute boundary as a plain record (:meth:`TPMError.to_record`),
never as a pickled exception, and are raised again on the client as :class:`RemoteError`.
A refusal may carry structured fields besides its message: ``retry_after_s`` (when trying
again can pass) and ``limit`` (the name of the limit hit), e.g. on :class:`RateLimited`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TPMError(Exception):
    """Root of every tpm_faas error.

    :param message: what went wrong, naming the offending field or value
    :param code: overrides the class's default code
    """

    #: The class's default code; an instance may carry another (see ``__init__``).
    code: str = "internal"
    exit_code: ClassVar[int] = 1
    #: Which layer refused or failed the request: request, auth, policy, rate_limit, ledger,
    #: shard, config or internal.
    layer: ClassVar[str] = "internal"
    #: Seconds after which the same request may pass (a refusal that waiting can lift).
    retry_after_s: float | None = None
    #: The name of the limit that refused the request (a policy field, e.g. ``requests_per_min``).
    limit: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.request_id: str | None = None

    @property
    def error_code(self) -> str:
        """The code of this instance (an alias of :attr:`code`)."""
        return self.code

    def to_record(self, request_id: str | None = None) -> dict[str, Any]:
        """The plain record that crosses process and network boundaries (``retry_after_s``
        and ``limit`` only when set, so other records are as they always were)."""
        record: dict[str, Any] = {
            "type": type(self).__name__,
            "code": self.error_code,
            "layer": self.layer,
            "message": self.message,
            "request_id": request_id or self.request_id,
        }
        if self.retry_after_s is not None:
            record["retry_after_s"] = self.retry_after_s
        if self.limit is not None:
            record["limit"] = self.limit
        return record

    def __str__(self) -> str:
        return f"[{self.error_code}] {self.message}"


class RequestError(TPMError, ValueError):
    """The request itself is wrong; fix it and send it again."""

    code = "bad_request"
    exit_code = 2
    layer = "request"


class MalformedRequest(RequestError):
    code = "malformed_json"


class UnknownModel(RequestError):
    code = "unknown_model"


class LimitExceeded(RequestError):
    code = "limit_exceeded"


class RateLimited(LimitExceeded):
    """Over a rate or concurrency limit of the caller's group.

    :param retry_after_s: when the request may pass if sent again (``None``: waiting cannot
        help, e.g. one request larger than the whole limit)
    :param limit: the policy limit hit (``requests_per_min``, ``group_requests_per_min``,
        ``tokens_per_min``, ``group_tokens_per_min`` or ``max_concurrent``)
    """

    code = "rate_limited"
    layer = "rate_limit"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after_s: float | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s
        self.limit = limit


class TensorError(RequestError):
    code = "bad_tensor"


class UnknownResult(RequestError):
    """A referenced earlier result is not one of the caller's results at this site."""

    code = "unknown_result"


class AuthError(TPMError, PermissionError):
    """The caller could not be authenticated for this mode."""

    code = "unauthorized"
    exit_code = 3
    layer = "auth"


class TokenMissing(AuthError):
    code = "token_missing"


class TokenInvalid(AuthError):
    code = "token_invalid"


class TokenExpired(AuthError):
    code = "token_expired"


class ScopeMissing(AuthError):
    code = "scope_missing"


class PolicyDenied(TPMError, PermissionError):
    """The site policy does not allow this request."""

    code = "policy_denied"
    exit_code = 4
    layer = "policy"


class LedgerError(TPMError):
    code = "ledger_error"
    exit_code = 5
    layer = "ledger"


class InsufficientFunds(LedgerError):
    code = "insufficient_su"


class DuplicateRequest(LedgerError):
    code = "duplicate_request"


class ShardGroupError(TPMError, RuntimeError):
    """The shard group serving the model is not reachable or failed the request."""

    code = "shard_unavailable"
    exit_code = 6
    layer = "shard"


class ShardTimeout(ShardGroupError, TimeoutError):
    code = "shard_timeout"


class ConfigError(TPMError):
    """Site configuration (policy, tokens file, settings) is invalid or missing."""

    code = "config_error"
    exit_code = 7
    layer = "config"


class MissingExtra(ConfigError, ImportError):
    """An optional part of tpm_faas is used but its extra is not installed.

    Raised by :func:`tpm_faas._extras.require` where the object that needs it is built; the
    message names the extra to install (``pip install 'tpm-faas[site]'``).
    """

    code = "missing_extra"


class UnsupportedArchitecture(ConfigError):
    """A checkpoint's architecture (``config.json``'s ``model_type``) is not one the runtime
    serves; the message lists those it does (:mod:`tpm_faas.architectures`)."""

    code = "unsupported_architecture"


class VersionError(ConfigError):
    """A stored model version cannot be reconstructed exactly: a payload is corrupted or
    truncated, a declared dtype or shape does not match it, the parent is not the one it was
    encoded against, or the decoded words do not hash to the recorded sha256. The message
    names the tensor; the version is never served (:mod:`tpm_faas.versions`)."""

    code = "version_error"


class RemoteError(TPMError):
    """An error raised on the endpoint side, carried back as a record.

    :param code: the remote error's code
    :param remote_type: the remote exception's class name
    :param request_id: the request it belongs to
    :param retry_after_s: the remote refusal's ``retry_after_s``, if any
    :param limit: the remote refusal's ``limit``, if any
    :param task_id: the Globus Compute task, when the transport's future names one
    """

    exit_code = 8

    def __init__(
        self,
        message: str,
        *,
        code: str,
        remote_type: str = "TPMError",
        request_id: str | None = None,
        layer: str = "internal",
        retry_after_s: float | None = None,
        limit: str | None = None,
        task_id: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.remote_type = remote_type
        self.request_id = request_id
        self.remote_layer = layer
        self.retry_after_s = retry_after_s
        self.limit = limit
        self.task_id = task_id

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RemoteError:
        retry_after = record.get("retry_after_s")
        limit = record.get("limit")
        return cls(
            str(record.get("message", "")),
            code=str(record.get("code", "internal")),
            remote_type=str(record.get("type", "TPMError")),
            request_id=record.get("request_id"),
            layer=str(record.get("layer", "internal")),
            retry_after_s=float(retry_after) if retry_after is not None else None,
            limit=str(limit) if limit is not None else None,
        )


class TaskTimeout(RemoteError, TimeoutError):
    """No reply came back from the endpoint in time (the client's ``timeout_s`` or
    ``deadline_s``). The task may still run, and be charged, on the endpoint; the message
    names the request id (and the Globus Compute task id, when known) to look it up.
    """

    code = "client_timeout"

    def __init__(
        self, message: str, *, request_id: str | None = None, task_id: str | None = None
    ) -> None:
        super().__init__(
            message,
            code=type(self).code,
            remote_type=type(self).__name__,
            request_id=request_id,
            layer="compute",
            task_id=task_id,
        )


class ServiceUnreachable(TPMError, ConnectionError):
    """A service tpm_faas calls (Globus Auth, the Globus Compute web service) cannot be
    reached: the network, a proxy or the service is down. Nothing was changed; try again."""

    code = "service_unreachable"
    exit_code = 9
    layer = "network"
