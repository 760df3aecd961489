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
    *,
    active: bool = True,
    scopes: tuple[str, ...] = ("query",),
    exp_in: int = 3600,
    aud: tuple[str, ...] = (CLIENT_ID,),
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
        "aud": list(aud),
        "iss": "https://auth.globus.org",
        "exp": int(time.time()) + exp_in,
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


@responses.activate
def test_expired_token_is_refused_and_not_served_from_the_cache() -> None:
    from tpm_faas.errors import TokenExpired

    register(introspection(exp_in=-5))
    auth = Authenticator(GlobusIntrospector(CLIENT_ID, "secret"), CLIENT_ID)
    for _ in range(2):
        with pytest.raises(TokenExpired, match="expired"):
            auth.require("tok-6", "query")
    assert len(responses.calls) == 2  # an expired answer is never reused


@responses.activate
def test_token_for_another_service_is_refused() -> None:
    register(introspection(aud=("transfer.api.globus.org",)))
    auth = Authenticator(GlobusIntrospector(CLIENT_ID, "secret"), CLIENT_ID)
    with pytest.raises(TokenInvalid, match="audience lacks"):
        auth.require("tok-7", "query")


@responses.activate
def test_the_cache_is_bounded() -> None:
    register(introspection())
    intro = GlobusIntrospector(CLIENT_ID, "secret", cache_size=2)
    for tok in ("a-token-1", "a-token-2", "a-token-3", "a-token-1"):
        intro.introspect(tok)
    assert len(intro._cache) == 2 and len(responses.calls) == 4  # token 1 was evicted


# -- the client side: tokens through globus_sdk apps; the resource server's scopes ----------
SECRET = "s3cr3t"
WORKFLOW = "2c4a6e8f-0000-4000-8000-00000000f10f"


def _client_credentials_token(token: str = "tpm-access-token") -> None:
    RegisteredResponse(
        service="auth",
        path="/v2/oauth2/token",
        method="POST",
        json={
            "access_token": token,
            "scope": " ".join(mode_scope(CLIENT_ID, m) for m in ("query", "embed", "intervene")),
            "expires_in": 172800,
            "token_type": "Bearer",
            "resource_server": CLIENT_ID,
            "other_tokens": [],
        },
    ).add()


@responses.activate
def test_workflow_tokens_by_client_credentials_go_with_each_request() -> None:
    from concurrent.futures import Future

    from tpm_faas.client import TPMClient
    from tpm_faas.globus_auth import GlobusTokens

    _client_credentials_token()
    tokens = GlobusTokens.for_client(CLIENT_ID, WORKFLOW, SECRET)
    sent: list[str | None] = []

    class Recorder:
        def submit(self, mode: str, request_json: str, token: str | None) -> Future[str]:
            sent.append(token)
            f: Future[str] = Future()
            f.set_result('{"ok": false, "error": {"code": "x", "message": "stop"}}')
            return f

    client = TPMClient(Recorder(), token=tokens)
    for _ in range(2):
        with pytest.raises(Exception, match="stop"):
            client.generate("hi")
    assert sent == ["tpm-access-token", "tpm-access-token"]
    grant = urllib.parse.parse_qs(str(responses.calls[0].request.body))
    assert grant["grant_type"] == ["client_credentials"]
    assert set(grant["scope"][0].split()) == {
        mode_scope(CLIENT_ID, m) for m in ("query", "embed", "intervene")
    }
    assert len(responses.calls) == 1  # the token is reused until it expires


@responses.activate
def test_auth_setup_creates_only_the_missing_scopes() -> None:
    from click.testing import CliRunner

    from tpm_faas.cli import main

    _client_credentials_token("manage-token")
    query_scope = mode_scope(CLIENT_ID, "query")
    RegisteredResponse(
        service="auth",
        path="/v2/api/scopes",
        json={"scopes": [{"scope_string": query_scope, "id": "q", "name": "Query"}]},
    ).add()
    for mode in ("embed", "intervene"):
        RegisteredResponse(
            service="auth",
            method="POST",
            path=f"/v2/api/clients/{CLIENT_ID}/scopes",
            json={"scope": {"scope_string": mode_scope(CLIENT_ID, mode), "id": mode}},
            match=[
                responses.matchers.json_params_matcher(
                    {"scope": {"scope_suffix": mode}}, strict_match=False
                )
            ],
        ).add()
    out = CliRunner().invoke(
        main, ["auth", "setup", "--client-id", CLIENT_ID, "--client-secret", SECRET]
    )
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:2] == ["exists", "query"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["created", "embed"], ["created", "intervene"]]
    created = [
        c for c in responses.calls if c.request.method == "POST" and "scopes" in c.request.url
    ]
    assert len(created) == 2
    token_call = responses.calls[0].request
    assert "manage_projects" in urllib.parse.unquote_plus(str(token_call.body))
    dry = CliRunner().invoke(
        main, ["auth", "setup", "--client-id", CLIENT_ID, "--client-secret", SECRET, "--dry-run"]
    )
    assert "would create embed" in " ".join(dry.output.split())


@responses.activate
def test_globus_groups_are_looked_up_for_the_policy() -> None:
    from globus_sdk.testing import load_response

    from tpm_faas.policy import Caller, Policy

    register(introspection())
    dep = load_response("auth.oauth2_get_dependent_tokens", case="groups")
    mine = load_response("groups.get_my_groups")
    auth = Authenticator(GlobusIntrospector(CLIENT_ID, "secret", groups=True), CLIENT_ID)
    who = auth.require("tok-8", "query")
    assert who.groups == {g["id"] for g in mine.json}  # type: ignore[union-attr]
    grant = urllib.parse.parse_qs(str(responses.calls[1].request.body))
    assert grant["grant_type"] == ["urn:globus:auth:grant_type:dependent_token"]
    assert grant["token"] == ["tok-8"]
    assert responses.calls[2].request.headers["Authorization"] == (
        f"Bearer {dep.metadata['rs_data']['groups.api.globus.org']['access_token']}"
    )
    group_id = sorted(who.groups)[0]
    policy = Policy.parse(
        f"""
models: {{m@1: {{}}}}
groups:
  - {{name: lab, match: {{globus_groups: ["{group_id}"]}}, modes: [query], models: [m@1],
     allocation: lab}}
""".encode()
    )
    caller = Caller(who.identity, who.username, who.identity_set, who.groups)
    assert policy.decide(caller, mode="query", model="m@1").project == "lab"


@responses.activate
def test_a_failed_group_lookup_refuses() -> None:
    register(introspection())
    RegisteredResponse(
        service="auth", path="/v2/oauth2/token", method="POST", json={"error": "x"}, status=400
    ).add()
    auth = Authenticator(GlobusIntrospector(CLIENT_ID, "secret", groups=True), CLIENT_ID)
    with pytest.raises(AuthError, match="Globus groups"):
        auth.require("tok-9", "query")


@responses.activate
def test_auth_setup_with_groups_declares_the_groups_dependent_scope() -> None:
    from click.testing import CliRunner
    from globus_sdk.scopes import GroupsScopes

    from tpm_faas.cli import main

    _client_credentials_token("manage-token")
    groups_scope = str(GroupsScopes.view_my_groups_and_memberships)
    RegisteredResponse(
        service="auth",
        path="/v2/api/scopes",
        json={"scopes": []},
        match=[
            responses.matchers.query_param_matcher(
                {
                    "scope_strings": ",".join(
                        mode_scope(CLIENT_ID, m) for m in ("query", "embed", "intervene")
                    )
                }
            )
        ],
    ).add()
    RegisteredResponse(
        service="auth",
        path="/v2/api/scopes",
        json={"scopes": [{"scope_string": groups_scope, "id": "groups-scope-id"}]},
        match=[responses.matchers.query_param_matcher({"scope_strings": groups_scope})],
    ).add()
    for mode in ("query", "embed", "intervene"):
        RegisteredResponse(
            service="auth",
            method="POST",
            path=f"/v2/api/clients/{CLIENT_ID}/scopes",
            json={"scope": {"scope_string": mode_scope(CLIENT_ID, mode), "id": mode}},
            match=[
                responses.matchers.json_params_matcher(
                    {
                        "scope": {
                            "scope_suffix": mode,
                            "dependent_scopes": [
                                {
                                    "scope": "groups-scope-id",
                                    "optional": False,
                                    "requires_refresh_token": False,
                                }
                            ],
                        }
                    },
                    strict_match=False,
                )
            ],
        ).add()
    out = CliRunner().invoke(
        main, ["auth", "setup", "--client-id", CLIENT_ID, "--client-secret", SECRET, "--groups"]
    )
    assert out.exit_code == 0, out.output
    assert [ln.split()[0] for ln in out.output.splitlines()] == ["created"] * 3
