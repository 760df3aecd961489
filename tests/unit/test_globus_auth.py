"""GlobusIntrospector against Globus Auth's introspection protocol (``globus_sdk.testing``).

The unmodified ``globus_sdk`` client makes the HTTP call; ``responses`` answers it with the
body Globus Auth sends, so what is tested is our request and our reading of the reply.
"""

from __future__ import annotations

import time
import urllib.parse

import pytest
import responses
from globus_sdk.testing import RegisteredResponse

from tpm_faas.errors import AuthError, ScopeMissing, TokenInvalid
from tpm_faas.gateway.auth import Authenticator, GlobusIntrospector, mode_scope

CLIENT_ID = "6b8f0b44-1a3c-4d7e-9d0f-2f1e7c5a9b10"
IDENTITY = "ae341a98-d274-11e5-b888-dbae3a8ba545"
LINKED = "c8aad43e-d274-11e5-bf98-8b02896cf782"


def introspection(
    *, active: bool = True, scopes: tuple[str, ...] = ("query",)
) -> dict[str, object]:
    if not active:
        return {"active": False}
    return {
        "active": True,
        "token_type": "Bearer",
        "scope": " ".join(mode_scope(CLIENT_ID, s) for s in scopes),
        "client_id": "0a1b2c3d-native-app",
        "username": "ada@uchicago.edu",
        "sub": IDENTITY,
        "aud": [CLIENT_ID],
        "iss": "https://auth.globus.org",
        "exp": int(time.time()) + 3600,
        "iat": int(time.time()),
        "identity_set": [IDENTITY, LINKED],
    }


def register(body: dict[str, object], status: int = 200) -> None:
    RegisteredResponse(
        service="auth",
        path="/v2/oauth2/token/introspect",
        method="POST",
        json=body,
        status=status,
    ).add()


@responses.activate
def test_active_token_with_scope_is_admitted_and_cached() -> None:
    register(introspection(scopes=("query", "intervene")))
    auth = Authenticator(GlobusIntrospector(CLIENT_ID, "secret"), CLIENT_ID, mapped_identity=LINKED)
    who = auth.require("tok-1", "query")
    assert who.identity == IDENTITY and who.username == "ada@uchicago.edu"
    assert len(responses.calls) == 1
    sent = urllib.parse.parse_qs(str(responses.calls[0].request.body))
    assert sent["token"] == ["tok-1"] and sent["include"] == ["identity_set"]
    # Cached until expiry: a second mode check makes no second call.
    auth.require("tok-1", "intervene")
    assert len(responses.calls) == 1


@responses.activate
def test_inactive_token_is_refused() -> None:
    register(introspection(active=False))
    auth = Authenticator(GlobusIntrospector(CLIENT_ID, "secret"), CLIENT_ID)
    with pytest.raises(TokenInvalid, match="not active"):
        auth.require("tok-2", "query")


@responses.activate
def test_scope_of_another_mode_is_refused() -> None:
    register(introspection(scopes=("query",)))
    auth = Authenticator(GlobusIntrospector(CLIENT_ID, "secret"), CLIENT_ID)
    with pytest.raises(ScopeMissing, match="/embed"):
        auth.require("tok-3", "embed")


@responses.activate
def test_identity_not_mapped_here_is_refused() -> None:
    register(introspection())
    auth = Authenticator(
        GlobusIntrospector(CLIENT_ID, "secret"), CLIENT_ID, mapped_identity="someone-else"
    )
    with pytest.raises(TokenInvalid, match="another user"):
        auth.require("tok-4", "query")


@responses.activate
def test_auth_outage_fails_closed() -> None:
    register({"errors": [{"code": "InternalError"}]}, status=500)
    auth = Authenticator(GlobusIntrospector(CLIENT_ID, "secret"), CLIENT_ID)
    with pytest.raises(AuthError, match="introspection failed"):
        auth.require("tok-5", "query")
