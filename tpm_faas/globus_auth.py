"""Globus Auth for users and site admins: tokens for the modes, and the scopes that grant them.

The TPM resource server (a Globus Auth confidential client of the site) has one scope per
mode, ``https://auth.globus.org/scopes/<client_id>/<mode>``. People get tokens for them
through ``globus_sdk.UserApp`` (a browser login, tokens kept in ``~/.globus``); workflows
through ``globus_sdk.ClientApp`` (client credentials). :class:`GlobusTokens` is what
:class:`tpm_faas.client.TPMClient` calls before each request (``token=``), so a refreshed token
is always the one sent. :func:`setup_scopes` creates the scopes on the resource server
(``tpm-faas auth setup``). ``globus_sdk`` is imported only here, when used. Admin calls bound each
HTTP request (:func:`short_timeouts`), so they fail in seconds without a network.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tpm_faas.errors import AuthError
from tpm_faas.modes import MODE_NAMES as MODES
from tpm_faas.modes import get_mode

#: Seconds one HTTP request to a Globus service may take (connect or read) in admin commands.
HTTP_TIMEOUT_S = 10.0
#: How many times such a request that failed on the network is tried again.
HTTP_RETRIES = 1


def short_timeouts(*clients: Any) -> None:
    """Give ``globus_sdk`` clients :data:`HTTP_TIMEOUT_S` per request and :data:`HTTP_RETRIES`
    retries (at most 2 s apart), so an admin command fails in seconds when offline (the SDK's
    defaults are 60 s and 5 retries with backoff). ``None`` entries are skipped."""
    for c in clients:
        if c is None:
            continue
        c.transport.http_timeout = HTTP_TIMEOUT_S
        c.retry_config.max_retries = HTTP_RETRIES
        c.retry_config.max_sleep = 2


def mode_scopes(resource_server: str, modes: Iterable[str] = MODES) -> list[str]:
    """The scope strings of ``modes`` on the TPM resource server ``resource_server``."""
    from tpm_faas.gateway.auth import mode_scope

    return [mode_scope(resource_server, m) for m in modes]


class GlobusTokens:
    """A callable that returns a valid access token for the TPM resource server.

    :param app: a ``globus_sdk.GlobusApp`` whose scope requirements include the mode scopes
    :param resource_server: the TPM resource server's client id
    """

    def __init__(self, app: Any, resource_server: str) -> None:
        self.app = app
        self.resource_server = resource_server

    @classmethod
    def for_user(
        cls,
        resource_server: str,
        native_client_id: str,
        modes: Iterable[str] = MODES,
        *,
        app_name: str = "tpm-faas",
    ) -> GlobusTokens:
        """A person's tokens: a browser login the first time, then refreshed from storage."""
        import globus_sdk

        app = globus_sdk.UserApp(
            app_name,
            client_id=native_client_id,
            scope_requirements={resource_server: mode_scopes(resource_server, modes)},
            config=globus_sdk.GlobusAppConfig(request_refresh_tokens=True),
        )
        return cls(app, resource_server)

    @classmethod
    def for_client(
        cls,
        resource_server: str,
        client_id: str,
        client_secret: str,
        modes: Iterable[str] = MODES,
        *,
        app_name: str = "tpm-faas",
    ) -> GlobusTokens:
        """A workflow's tokens, by the client-credentials grant (kept in memory)."""
        import globus_sdk

        app = globus_sdk.ClientApp(
            app_name,
            client_id=client_id,
            client_secret=client_secret,
            scope_requirements={resource_server: mode_scopes(resource_server, modes)},
            config=globus_sdk.GlobusAppConfig(token_storage="memory"),
        )
        return cls(app, resource_server)

    def __call__(self) -> str:
        import globus_sdk

        try:
            header = self.app.get_authorizer(self.resource_server).get_authorization_header()
        except globus_sdk.GlobusError as e:
            raise AuthError(f"could not get a token for {self.resource_server}: {e}") from e
        if not header or not header.startswith("Bearer "):
            raise AuthError(f"Globus Auth gave no bearer token for {self.resource_server}")
        return str(header.removeprefix("Bearer "))


@dataclass(frozen=True)
class ScopeAction:
    mode: str
    scope: str
    action: str  # "created" | "exists" | "would create"


def setup_scopes(
    client_id: str,
    client_secret: str,
    *,
    modes: Iterable[str] = MODES,
    dry_run: bool = False,
    groups: bool = False,
) -> list[ScopeAction]:
    """Create the mode scopes on the resource server ``client_id`` (those that do not exist).

    Authenticates as the resource server itself (client credentials with the
    ``manage_projects`` scope), lists its scopes, and creates each missing one with
    ``AuthClient.create_scope``. With ``groups``, each scope declares Globus Groups'
    ``view_my_groups_and_memberships`` as a dependent scope, so the endpoint can look up the
    caller's groups (``TPM_FAAS_GLOBUS_GROUPS=1``).
    """
    import globus_sdk
    from globus_sdk.scopes import AuthScopes

    login = globus_sdk.ConfidentialAppAuthClient(client_id, client_secret)
    short_timeouts(login)  # before the authorizer, which fetches its first token at once
    auth = globus_sdk.AuthClient(
        authorizer=globus_sdk.ClientCredentialsAuthorizer(login, AuthScopes.manage_projects)
    )
    short_timeouts(auth)
    wanted = dict(zip(modes, mode_scopes(client_id, modes), strict=True))
    try:
        existing = {s["scope_string"] for s in auth.get_scopes(scope_strings=list(wanted.values()))}
    except globus_sdk.GlobusAPIError as e:
        if e.http_status != 404:
            raise AuthError(f"could not list the scopes of {client_id}: {e}") from e
        existing = set()
    done = []
    for mode, scope in wanted.items():
        if scope in existing:
            done.append(ScopeAction(mode, scope, "exists"))
            continue
        if dry_run:
            done.append(ScopeAction(mode, scope, "would create"))
            continue
        name, description = get_mode(mode).scope_title, get_mode(mode).scope_description
        extra: dict[str, Any] = {}
        if groups:
            extra["dependent_scopes"] = [
                globus_sdk.DependentScopeSpec(_groups_scope_id(auth), False, False)
            ]
        try:
            made = auth.create_scope(client_id, name, description, mode, **extra)
        except globus_sdk.GlobusAPIError as e:
            raise AuthError(f"could not create the scope {scope}: {e}") from e
        done.append(ScopeAction(mode, str(made["scope"]["scope_string"]), "created"))
    return done


def _groups_scope_id(auth: Any) -> str:
    """The Auth id of Globus Groups' ``view_my_groups_and_memberships`` scope."""
    import globus_sdk
    from globus_sdk.scopes import GroupsScopes

    wanted = str(GroupsScopes.view_my_groups_and_memberships)
    try:
        for s in auth.get_scopes(scope_strings=[wanted]):
            return str(s["id"])
    except globus_sdk.GlobusAPIError as e:
        raise AuthError(f"could not look up the scope {wanted}: {e}") from e
    raise AuthError(f"Globus Auth does not know the scope {wanted}")
