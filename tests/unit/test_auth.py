"""Token checks: each failure names the check that failed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tpm_faas.errors import ConfigError, ScopeMissing, TokenExpired, TokenInvalid, TokenMissing
from tpm_faas.gateway.auth import Authenticator, LocalIntrospector, TokenInfo, mode_scope


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    now = datetime.now(UTC)
    p = tmp_path / "tokens.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "client_id": "cid",
                "tokens": [
                    {
                        "token": "good-token",
                        "identity": "a@x",
                        "scopes": ["query", "embed"],
                        "expires_at": (now + timedelta(hours=1)).isoformat(),
                    },
                    {
                        "token": "old-token1",
                        "identity": "a@x",
                        "scopes": ["query"],
                        "expires_at": (now - timedelta(hours=1)).isoformat(),
                    },
                    {
                        "token": "off-token1",
                        "identity": "a@x",
                        "scopes": ["query"],
                        "expires_at": (now + timedelta(hours=1)).isoformat(),
                        "active": False,
                    },
                ],
            }
        )
    )
    return p


def test_good_token(tokens_file: Path) -> None:
    auth = Authenticator(LocalIntrospector(tokens_file), "cid")
    p = auth.require("good-token", "query")
    assert p.identity == "a@x"


@pytest.mark.parametrize(
    "token,mode,exc",
    [
        (None, "query", TokenMissing),
        ("", "query", TokenMissing),
        ("no-such-token", "query", TokenInvalid),
        ("off-token1", "query", TokenInvalid),
        ("old-token1", "query", TokenExpired),
        ("good-token", "intervene", ScopeMissing),
    ],
)
def test_refusals(tokens_file: Path, token: str | None, mode: str, exc: type[Exception]) -> None:
    auth = Authenticator(LocalIntrospector(tokens_file), "cid")
    with pytest.raises(exc):
        auth.require(token, mode)


def test_wrong_audience(tokens_file: Path) -> None:
    with pytest.raises(TokenInvalid, match="audience"):
        Authenticator(LocalIntrospector(tokens_file), "other-client").require("good-token", "query")


def test_mapped_identity_must_match(tokens_file: Path) -> None:
    ok = Authenticator(LocalIntrospector(tokens_file), "cid", mapped_identity="a@x")
    ok.require("good-token", "query")
    bad = Authenticator(LocalIntrospector(tokens_file), "cid", mapped_identity="b@x")
    with pytest.raises(TokenInvalid, match="identit"):
        bad.require("good-token", "query")


def test_introspection_response_parsing() -> None:
    info = TokenInfo.from_introspection(
        {
            "active": True,
            "sub": "uuid-1",
            "username": "u@org",
            "scope": f"{mode_scope('c', 'query')} openid",
            "aud": ["c"],
            "exp": 2e9,
            "identity_set": ["uuid-1", "uuid-2"],
        }
    )
    assert mode_scope("c", "query") in info.scopes and "uuid-2" in info.identity_set
    assert not TokenInfo.from_introspection({"active": False}).active


def test_bad_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        LocalIntrospector(tmp_path / "missing.yaml")
    (tmp_path / "t.yaml").write_text(
        "tokens: [{token: abcdefgh, identity: a, scopes: [], expires_at: x, extra: 1}]"
    )
    with pytest.raises(ConfigError):
        LocalIntrospector(tmp_path / "t.yaml")
