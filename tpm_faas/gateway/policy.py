"""The site policy file: who may use which mode and model, at which limits and SU rates.

Default deny: a caller matched by no group is refused. The first group that matches the
caller's identity (or its domain) and allows the mode and model decides. The file is a YAML
document validated into frozen pydantic models (unknown keys rejected with their path);
its sha256 goes with every decision.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tpm_faas.errors import ConfigError, LimitExceeded, PolicyDenied

Mode = Literal["query", "embed", "intervene"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Frozen):
    """Who a group is: identities (ids or usernames) and/or username domains."""

    identities: list[str] = []
    domains: list[str] = []


class Limits(_Frozen):
    max_prompts: int = Field(default=8, ge=1)
    max_prompt_tokens: int = Field(default=2048, ge=1)
    max_new_tokens: int = Field(default=256, ge=0)
    max_input_bytes: int = Field(default=4_000_000, ge=0)
    max_bytes_returned: int = Field(default=4_000_000, ge=0)
    max_hook_sites: int = Field(default=64, ge=0)
    allowed_ops: list[str] = ["save", "logit_lens"]
    write: bool = False


class Group(_Frozen):
    name: str
    match: Match
    modes: list[Mode]
    models: list[str]
    tier: str = "standard"
    allocation: str = Field(description="the ledger project charged for this group's use")
    limits: Limits = Limits()


class Rates(_Frozen):
    """SU rates of one model (SU, floats here; the ledger stores integer micro-SU)."""

    per_request: float = Field(default=0.0, ge=0)
    input_token: float = Field(default=0.0, ge=0)
    output_token: float = Field(default=0.0, ge=0)
    gb_returned: float = Field(default=0.0, ge=0)
    hooked_site: float = Field(default=0.0, ge=0)


class PolicyFile(_Frozen):
    version: Literal[1] = 1
    default: Literal["deny"] = "deny"
    hold_ttl_s: int = Field(default=3600, ge=10)
    tiers: dict[str, float] = {"standard": 1.0}
    models: dict[str, Rates]
    groups: list[Group]


@dataclass(frozen=True)
class Usage:
    """What a request consumes, the quantities SU are charged on."""

    input_tokens: int = 0
    output_tokens: int = 0
    bytes_returned: int = 0
    hooked_sites: int = 0


@dataclass(frozen=True)
class Decision:
    """An admitted caller: the group that let them in and what it allows."""

    group: str
    project: str
    tier: str
    limits: Limits
    rates: Rates
    multiplier: float
    policy_sha256: str

    def price_micro(self, usage: Usage) -> int:
        """Integer micro-SU for ``usage`` (rounded up, exact rational arithmetic)."""
        r = self.rates
        su = Fraction(str(self.multiplier)) * (
            Fraction(str(r.per_request))
            + Fraction(str(r.input_token)) * usage.input_tokens
            + Fraction(str(r.output_token)) * usage.output_tokens
            + Fraction(str(r.gb_returned)) * Fraction(usage.bytes_returned, 10**9)
            + Fraction(str(r.hooked_site)) * usage.hooked_sites
        )
        return math.ceil(su * 1_000_000)


class Policy:
    """A loaded policy file."""

    def __init__(self, data: PolicyFile, sha256: str, source: str = "<memory>") -> None:
        self.data = data
        self.sha256 = sha256
        self.source = source

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            text = path.read_bytes()
        except FileNotFoundError as e:
            raise ConfigError(f"policy file {path} does not exist") from e
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: bytes, source: str = "<memory>") -> Policy:
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"policy file {source} is not valid YAML: {e}") from e
        try:
            data = PolicyFile.model_validate(raw)
        except ValidationError as e:
            where = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
            )
            raise ConfigError(f"policy file {source} is invalid: {where}") from e
        for g in data.groups:
            if g.tier not in data.tiers:
                raise ConfigError(
                    f"policy file {source}: group {g.name!r} uses unknown tier {g.tier!r}"
                )
        return cls(data, hashlib.sha256(text).hexdigest(), source)

    def decide(self, identity: str, username: str, mode: str, model: str) -> Decision:
        """The decision for a caller, or :class:`PolicyDenied` naming why (default deny)."""
        matched = [g for g in self.data.groups if _matches(g.match, identity, username)]
        if not matched:
            raise PolicyDenied(f"no group of the site policy admits {username or identity}")
        for g in matched:
            if mode in g.modes and model in g.models:
                rates = self.data.models.get(model)
                if rates is None:
                    raise PolicyDenied(f"the site policy sets no SU rates for model {model}")
                return Decision(
                    group=g.name,
                    project=g.allocation,
                    tier=g.tier,
                    limits=g.limits,
                    rates=rates,
                    multiplier=self.data.tiers[g.tier],
                    policy_sha256=self.sha256,
                )
        names = ", ".join(g.name for g in matched)
        if not any(mode in g.modes for g in matched):
            raise PolicyDenied(f"the {mode!r} mode is not allowed for your groups ({names})")
        raise PolicyDenied(f"model {model} is not allowed for your groups ({names})")


def _matches(m: Match, identity: str, username: str) -> bool:
    if identity in m.identities or (username and username in m.identities):
        return True
    domain = username.rpartition("@")[2] if "@" in username else ""
    return bool(domain) and domain in m.domains


def check_limit(what: str, value: int, limit: int) -> None:
    """Raise :class:`LimitExceeded` naming ``what`` when ``value`` is over ``limit``."""
    if value > limit:
        raise LimitExceeded(f"{what} is {value}; the limit for your group is {limit}")
