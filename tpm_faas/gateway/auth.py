"""Who is calling, and may they use this mode? Token introspection behind a small seam.

An :class:`Introspector` turns an access token into :class:`TokenInfo` (the fields of a Globus
Auth introspection response). :class:`Authenticator` applies the checks every mode needs and
says which one failed:

1. a token was sent;
2. it is ``active``;
3. it has not expired;
4. our resource server's client id is in ``aud``;
5. it carries the mode's scope (``https://auth.globus.org/scopes/<client_id>/<mode>``);
6. its identity set contains the identity the endpoint mapped this worker to (when known),
   so a token cannot be replayed by another user.

Two introspectors ship: :class:`GlobusIntrospector` (``globus_sdk``) for sites, and
:class:`LocalIntrospector` (a YAML file of dev tokens) for the embedded default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field

from tpm_faas.errors import (
    AuthError,
    ConfigError,
    ScopeMissing,
    TokenExpired,
    TokenInvalid,
    TokenMissing,
)

SCOPE_PREFIX = "https://auth.globus.org/scopes"
#: Globus access tokens are well under this; anything longer is refused before introspection.
MAX_TOKEN_LENGTH = 4096


def mode_scope(client_id: str, mode: str) -> str:
    """The Globus Auth scope string that grants ``mode`` on the resource server ``client_id``."""
    return f"{SCOPE_PREFIX}/{client_id}/{mode}"


@dataclass(frozen=True)
class TokenInfo:
    """What introspection says about a token (a subset of Globus Auth's response)."""

    active: bool
    sub: str = ""
    username: str = ""
    scopes: frozenset[str] = frozenset()
    aud: frozenset[str] = frozenset()
    exp: float = 0.0
    identity_set: frozenset[str] = frozenset()
    #: Globus group ids of the caller, where the introspector knows them (dev tokens).
    groups: frozenset[str] = frozenset()

    @classmethod
    def from_introspection(cls, data: dict[str, Any]) -> TokenInfo:
        """Build from the JSON body of ``POST /v2/oauth2/token/introspect``."""
        if not data.get("active"):
            return cls(active=False)
        return cls(
            active=True,
            sub=str(data.get("sub", "")),
            username=str(data.get("username", "")),
            scopes=frozenset(str(data.get("scope", "")).split()),
            aud=frozenset(data.get("aud") or ()),
            exp=float(data.get("exp") or 0),
            identity_set=frozenset(data.get("identity_set") or ()),
        )


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    identity: str
    username: str
    identity_set: frozenset[str] = field(default_factory=frozenset)
    groups: frozenset[str] = field(default_factory=frozenset)


class Introspector(Protocol):
    """Anything that can introspect an access token."""

    def introspect(self, token: str) -> TokenInfo: ...


class GlobusIntrospector:
    """Introspect with Globus Auth (``oauth2_token_introspect``, ``include=identity_set``).

    Answers are cached until the token's expiry (at most ``cache_size`` tokens, keyed by the
    token's sha256). Network errors fail closed after ``max_retries`` retries (the SDK's
    default of 5 would hold a request for about 15 s during an Auth outage).

    With ``groups=True`` (for policies that match on Globus groups) the caller's group ids are
    looked up too: a dependent token for Globus Groups (the mode scopes must declare
    ``view_my_groups_and_memberships`` as a dependent scope; ``tpm-faas auth setup --groups``),
    then ``GroupsClient.get_my_groups``. A failed lookup refuses the request.
    """

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        *,
        cache_size: int = 1024,
        max_retries: int = 1,
        groups: bool = False,
    ) -> None:
        import globus_sdk

        self._client = globus_sdk.ConfidentialAppAuthClient(client_id, client_secret)
        self._client.retry_config.max_retries = max_retries
        self._cache: dict[str, TokenInfo] = {}
        self._cache_size = cache_size
        self._groups = groups
        self._max_retries = max_retries

    def introspect(self, token: str) -> TokenInfo:
        import globus_sdk

        key = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(key)
        if hit is not None and hit.exp > time.time():
            return hit
        try:
            resp = self._client.oauth2_token_introspect(token, include="identity_set")
        except globus_sdk.GlobusError as e:
            raise AuthError(f"token introspection failed, so access is refused: {e}") from e
        info = TokenInfo.from_introspection(dict(resp.data))
        if info.active and self._groups:
            info = dataclasses.replace(info, groups=self._group_ids(token))
        if info.active:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = info
        return info

    def _group_ids(self, token: str) -> frozenset[str]:
        import globus_sdk
        from globus_sdk.scopes import GroupsScopes

        try:
            dep = self._client.oauth2_get_dependent_tokens(
                token, scope=str(GroupsScopes.view_my_groups_and_memberships)
            )
            groups_token = dep.by_resource_server[GroupsScopes.resource_server]["access_token"]
            gc = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(groups_token))
            gc.retry_config.max_retries = self._max_retries
            return frozenset(str(g["id"]) for g in gc.get_my_groups())
        except (globus_sdk.GlobusError, KeyError) as e:
            raise AuthError(
                f"could not look up your Globus groups, so access is refused: {e}"
            ) from e


class DevToken(BaseModel):
    """One entry of a dev tokens file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: str = Field(min_length=8)
    identity: str
    username: str = ""
    scopes: list[str]
    expires_at: datetime
    active: bool = True
    groups: list[str] = []


class DevTokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str = "local-dev"
    tokens: list[DevToken] = []


class LocalIntrospector:
    """Introspect against a YAML file of dev tokens (the embedded default; never for sites).

    Scopes may be written in full or as the mode suffix (``query``), which expands to the
    full scope of the file's ``client_id``.
    """

    def __init__(self, path: Path) -> None:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
            self._file = DevTokensFile.model_validate(raw)
        except FileNotFoundError as e:
            raise ConfigError(f"dev tokens file {path} does not exist") from e
        except (yaml.YAMLError, ValueError) as e:
            raise ConfigError(f"dev tokens file {path} is invalid: {e}") from e
        self._by_token = {t.token: t for t in self._file.tokens}

    def introspect(self, token: str) -> TokenInfo:
        t = self._by_token.get(token)
        if t is None or not t.active:
            return TokenInfo(active=False)
        cid = self._file.client_id
        scopes = frozenset(s if "/" in s else mode_scope(cid, s) for s in t.scopes)
        return TokenInfo(
            active=True,
            sub=t.identity,
            username=t.username or t.identity,
            scopes=scopes,
            aud=frozenset({cid}),
            exp=t.expires_at.timestamp(),
            identity_set=frozenset({t.identity}),
            groups=frozenset(t.groups),
        )


class Authenticator:
    """Applies the checks of this module's docstring for one resource server."""

    def __init__(
        self,
        introspector: Introspector,
        client_id: str,
        *,
        mapped_identity: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._introspector = introspector
        self._client_id = client_id
        self._mapped_identity = mapped_identity
        self._clock = clock

    def require(self, token: str | None, mode: str) -> Principal:
        """Return the caller if ``token`` grants ``mode``; otherwise raise an :class:`AuthError`."""
        if token is None or token == "":
            raise TokenMissing(f"no access token was sent; the {mode!r} mode needs one")
        if not isinstance(token, str):
            raise TokenInvalid(f"the access token must be a string, not {type(token).__name__}")
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenInvalid(f"the access token is longer than {MAX_TOKEN_LENGTH} characters")
        info = self._introspector.introspect(token)
        if not info.active:
            raise TokenInvalid("the access token is not active (unknown, revoked or malformed)")
        if info.exp <= self._clock():
            raise TokenExpired("the access token has expired; log in again")
        if self._client_id not in info.aud:
            raise TokenInvalid(
                f"the access token is not for this service (audience lacks {self._client_id})"
            )
        scope = mode_scope(self._client_id, mode)
        if scope not in info.scopes:
            raise ScopeMissing(f"the access token lacks the scope for the {mode!r} mode: {scope}")
        if self._mapped_identity and self._mapped_identity not in info.identity_set:
            raise TokenInvalid(
                "the access token's identities do not include the identity this endpoint "
                "runs as; tokens cannot be used on another user's behalf"
            )
        return Principal(
            identity=info.sub,
            username=info.username,
            identity_set=info.identity_set,
            groups=info.groups,
        )
