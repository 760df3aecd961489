"""The site policy file: who may use which mode and model, at which limits and SU rates.

Default deny: a caller matched by no group is refused. The first group that matches the
caller (by identity, username domain, Globus group, or membership of a project the file
lists) and allows the mode and model decides. The file is a YAML document validated into
frozen pydantic models (unknown keys rejected with their path and the closest known key;
JSON Schema in ``tpm_faas/data/policies/schema.json``); its sha256 goes with every decision, and
:meth:`Policy.explain` says which group decides for a caller and why. :class:`PolicyStore`
reloads a changed file and swaps the whole policy at once, keeping the old one if the new is
invalid.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import os
import threading
import types
import typing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from tpm_faas.errors import ConfigError, LimitExceeded, PolicyDenied

log = logging.getLogger(__name__)


def _known_mode(name: str) -> str:
    # The registry of modes (tpm_faas.modes) sits above this module: read at validation time.
    from tpm_faas.modes import MODE_NAMES

    if name not in MODE_NAMES:
        raise ValueError(f"unknown mode {name!r} (one of {', '.join(MODE_NAMES)})")
    return name


#: A mode's name, checked against the registry of modes.
Mode = Annotated[str, AfterValidator(_known_mode)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Frozen):
    """Who a group is; any one of these admits a caller."""

    identities: list[str] = Field(default=[], description="Globus identity ids or usernames")
    domains: list[str] = Field(default=[], description="username domains (alice@uni.edu)")
    globus_groups: list[str] = Field(default=[], description="Globus group ids")
    projects: list[str] = Field(default=[], description="projects of this file's 'projects'")


class Project(_Frozen):
    """An allocation's members (identities, usernames or Globus groups)."""

    members: list[str] = []
    globus_groups: list[str] = []


class Limits(_Frozen):
    max_prompts: int = Field(default=8, ge=1)
    max_prompt_tokens: int = Field(default=2048, ge=1)
    max_new_tokens: int = Field(default=256, ge=0)
    max_context_tokens: int | None = Field(
        default=None, ge=1, description="prompt plus new tokens, at most the model's context"
    )
    max_input_bytes: int = Field(default=4_000_000, ge=0)
    max_bytes_returned: int = Field(default=4_000_000, ge=0)
    max_hook_sites: int = Field(default=64, ge=0)
    requests_per_min: int | None = Field(default=None, ge=1, description="per identity")
    tokens_per_min: int | None = Field(
        default=None, ge=1, description="per identity; input + max_new_tokens reserved"
    )
    group_requests_per_min: int | None = Field(default=None, ge=1, description="whole group")
    group_tokens_per_min: int | None = Field(default=None, ge=1, description="whole group")
    max_concurrent: int | None = Field(default=None, ge=1, description="per identity")
    #: Intervention ops allowed; writes (set, add, ablate, patch, scale_heads, drop_experts)
    #: also need ``write``.
    allowed_ops: list[str] = ["save", "logit_lens"]
    #: Hook sites allowed, as shell-style patterns of canonical names (``blocks.*.hook_resid_*``).
    allowed_sites: list[str] = ["*"]
    write: bool = False


class Group(_Frozen):
    name: str
    match: Match
    modes: list[Mode]
    models: list[str] = Field(
        description="model versions the group may use: NAME@VERSION pins one version, NAME@* "
        "allows every version of NAME"
    )
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
    reproducible: float = Field(
        default=1.0,
        ge=1.0,
        description="price multiplier of a request that asks for reproducible: true (run "
        "alone, batch-invariant)",
    )


class PolicyFile(_Frozen):
    version: Literal[1] = 1
    default: Literal["deny"] = "deny"
    hold_ttl_s: int = Field(default=3600, ge=10)
    tiers: dict[str, float] = {"standard": 1.0}
    models: dict[str, Rates] = Field(
        description="SU rates per model version (NAME@VERSION), or for every version of a name "
        "(NAME@*; a version's own entry wins)"
    )
    projects: dict[str, Project] = {}
    groups: list[Group]


@dataclass(frozen=True)
class Usage:
    """What a request consumes, the quantities SU are charged on."""

    input_tokens: int = 0
    output_tokens: int = 0
    bytes_returned: int = 0
    hooked_sites: int = 0


def allows_model(allowed: typing.Iterable[str], model: str) -> bool:
    """Whether a group's ``models`` list admits ``model``: by its exact ``NAME@VERSION`` (a
    pinned version) or by ``NAME@*`` (every version of that name)."""
    name = model.partition("@")[0]
    return any(m == model or m == f"{name}@*" for m in allowed)


@dataclass(frozen=True)
class Caller:
    """Who is asking, as the policy sees them."""

    identity: str
    username: str = ""
    identity_set: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    @property
    def names(self) -> frozenset[str]:
        return frozenset({self.identity, self.username, *self.identity_set} - {""})


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

    def price_micro(self, usage: Usage, *, reproducible: bool = False) -> int:
        """Integer micro-SU for ``usage`` (rounded up, exact rational arithmetic); a
        ``reproducible`` request is priced at the model's ``reproducible`` multiplier."""
        r = self.rates
        factor = Fraction(str(r.reproducible)) if reproducible else Fraction(1)
        su = (
            Fraction(str(self.multiplier))
            * factor
            * (
                Fraction(str(r.per_request))
                + Fraction(str(r.input_token)) * usage.input_tokens
                + Fraction(str(r.output_token)) * usage.output_tokens
                + Fraction(str(r.gb_returned)) * Fraction(usage.bytes_returned, 10**9)
                + Fraction(str(r.hooked_site)) * usage.hooked_sites
            )
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
            where = "; ".join(_describe(err) for err in e.errors())
            raise ConfigError(f"policy file {source} is invalid: {where}") from e
        for g in data.groups:
            if g.tier not in data.tiers:
                raise ConfigError(
                    f"policy file {source}: group {g.name!r} uses unknown tier {g.tier!r}"
                )
        return cls(data, hashlib.sha256(text).hexdigest(), source)

    def decide(
        self,
        identity: str | Caller,
        username: str = "",
        mode: str = "query",
        model: str = "",
    ) -> Decision:
        """The decision for a caller, or :class:`PolicyDenied` naming why (default deny)."""
        caller = identity if isinstance(identity, Caller) else Caller(identity, username)
        matched = self.matching(caller)
        if not matched:
            who = caller.username or caller.identity
            raise PolicyDenied(f"no group of the site policy admits {who}")
        for g in matched:
            if mode in g.modes and allows_model(g.models, model):
                rates = self.rates_for(model)
                if rates is None:
                    raise PolicyDenied(f"the site policy sets no SU rates for model {model}")
                log.info(
                    "policy %s: %s may use %s on %s as group %s (project %s)",
                    self.sha256[:12],
                    caller.username or caller.identity,
                    mode,
                    model,
                    g.name,
                    g.allocation,
                )
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

    def explain(self, caller: Caller, *, mode: str, model: str) -> Explanation:
        """Every group's verdict on ``caller`` for ``mode`` on ``model``, and the decision
        (or why the caller is denied), without raising."""
        matched = self.matching(caller)
        verdicts = []
        for g in self.data.groups:
            if g not in matched:
                verdicts.append(GroupVerdict(g.name, False, False, "does not match"))
            elif mode in g.modes and allows_model(g.models, model):
                verdicts.append(GroupVerdict(g.name, True, True, "allows"))
            else:
                why = f"matches but does not allow {mode!r} on {model}"
                verdicts.append(GroupVerdict(g.name, True, False, why))
        try:
            decision: Decision | None = self.decide(caller, mode=mode, model=model)
            denied = None
        except PolicyDenied as e:
            decision, denied = None, e.message
        return Explanation(caller, mode, model, verdicts, decision, denied)

    def summary(self) -> dict[str, typing.Any]:
        """What the file grants, as JSON (``tpm-faas policy check --json``)."""
        d = self.data
        return {
            "source": self.source,
            "sha256": self.sha256,
            "default": d.default,
            "tiers": dict(d.tiers),
            "models": sorted(d.models),
            "projects": sorted(d.projects),
            "groups": [
                {
                    "name": g.name,
                    "modes": list(g.modes),
                    "models": list(g.models),
                    "project": g.allocation,
                    "tier": g.tier,
                    "write": g.limits.write,
                }
                for g in d.groups
            ],
            "warnings": self.warnings(),
        }

    def warnings(self) -> list[str]:
        """Valid but probably not meant: models a group allows that have no SU rates."""
        priced = {m.partition("@")[0] for m in self.data.models}

        def unpriced(m: str) -> bool:  # NAME@*: no version of NAME has rates
            name, _, version = m.partition("@")
            return name not in priced if version == "*" else self.rates_for(m) is None

        missing = sorted({m for g in self.data.groups for m in g.models if unpriced(m)})
        if not missing:
            return []
        return [f"no SU rates for {', '.join(missing)} (requests will be refused)"]

    def rates_for(self, model: str) -> Rates | None:
        """The SU rates of ``model``: its own entry, else its name's ``NAME@*`` entry."""
        models = self.data.models
        return models.get(model) or models.get(f"{model.partition('@')[0]}@*")

    def pinned(self) -> set[str]:
        """The concrete versions the policy names (in groups or rates); ``NAME@*`` pins none."""
        named = {m for g in self.data.groups for m in g.models} | set(self.data.models)
        return {m for m in named if not m.endswith("@*")}

    def allowed_versions(
        self, caller: Caller, mode: str, candidates: typing.Iterable[str]
    ) -> list[str]:
        """Those of ``candidates`` (model versions) that ``caller`` may use in ``mode`` and
        that have SU rates (without, a request on them is refused)."""
        groups = [g for g in self.matching(caller) if mode in g.modes]
        return [
            m
            for m in candidates
            if any(allows_model(g.models, m) for g in groups) and self.rates_for(m) is not None
        ]

    def matching(self, caller: Caller) -> list[Group]:
        """The groups that match ``caller``, in file order."""
        return [g for g in self.data.groups if self._matches(g.match, caller)]

    def _matches(self, m: Match, caller: Caller) -> bool:
        names = caller.names
        if names & set(m.identities) or caller.groups & set(m.globus_groups):
            return True
        domain = caller.username.rpartition("@")[2] if "@" in caller.username else ""
        if domain and domain in m.domains:
            return True
        for name in m.projects:
            p = self.data.projects.get(name)
            if p is not None and (names & set(p.members) or caller.groups & set(p.globus_groups)):
                return True
        return False


@dataclass(frozen=True)
class GroupVerdict:
    """What one group of the file says about a caller (see :meth:`Policy.explain`)."""

    group: str
    matches: bool
    allows: bool
    why: str


@dataclass(frozen=True)
class Explanation:
    """The decision a policy makes for a caller, a mode and a model, and why."""

    caller: Caller
    mode: str
    model: str
    groups: list[GroupVerdict]
    decision: Decision | None
    denied: str | None

    def record(self) -> dict[str, typing.Any]:
        d = self.decision
        return {
            "caller": self.caller.username or self.caller.identity,
            "mode": self.mode,
            "model": self.model,
            "groups": [
                {"group": v.group, "matches": v.matches, "allows": v.allows, "why": v.why}
                for v in self.groups
            ],
            "admit": d is not None,
            "denied": self.denied,
            "decision": None
            if d is None
            else {
                "group": d.group,
                "project": d.project,
                "tier": d.tier,
                "multiplier": d.multiplier,
                "limits": d.limits.model_dump(),
                "rates": d.rates.model_dump(),
            },
        }


def _describe(err: typing.Any) -> str:
    """One validation error as ``path: message``; an unknown key names the closest known one."""
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc)
    if err["type"] != "extra_forbidden" or not loc:
        return f"{where}: {err['msg']}"
    known = _known_keys(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"{where}: unknown key {loc[-1]!r}; did you mean {close[0]!r}?"
    return f"{where}: unknown key {loc[-1]!r} (known: {', '.join(known)})"


def _known_keys(loc: tuple[typing.Any, ...]) -> list[str]:
    """The keys the policy file accepts at ``loc`` (a validation error's location)."""
    node: typing.Any = PolicyFile
    for part in loc:
        node = _child(node, part)
        if node is None:
            return []
    model = _model_of(node)
    return list(model.model_fields) if model is not None else []


def _model_of(node: typing.Any) -> type[BaseModel] | None:
    if isinstance(node, type) and issubclass(node, BaseModel):
        return node
    if typing.get_origin(node) in (typing.Union, types.UnionType):
        for arg in typing.get_args(node):
            if (m := _model_of(arg)) is not None:
                return m
    return None


def _child(node: typing.Any, part: typing.Any) -> typing.Any:
    model = _model_of(node)
    if model is not None:
        field = model.model_fields.get(str(part))
        return None if field is None else field.annotation
    origin, args = typing.get_origin(node), typing.get_args(node)
    if origin is list and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


class PolicyStore:
    """The current policy of a file, reloaded when the file changes.

    :meth:`current` stats the file (cheap) and, when its mtime or size changed, parses the new
    text completely before swapping it in: a request sees the old policy or the new one, never
    a mix. An invalid new file is logged and the old policy stays.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._policy = Policy.load(path)  # a missing or invalid file: ConfigError
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> Policy:
        try:
            stamp = self._stat()
        except OSError:
            return self._policy
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self._policy = Policy.load(self.path)
                        log.info("policy %s reloaded: sha256 %s", self.path, self._policy.sha256)
                    except ConfigError as e:
                        log.error("policy %s not reloaded, keeping the old one: %s", self.path, e)
        return self._policy


def json_schema() -> str:
    """The JSON Schema of policy files (``tpm_faas/data/policies/schema.json``)."""
    import json

    from tpm_faas.modes import MODE_NAMES

    schema = PolicyFile.model_json_schema()
    schema["$defs"]["Group"]["properties"]["modes"]["items"]["enum"] = list(MODE_NAMES)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tpm_faas site policy"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def check_limit(what: str, value: int, limit: int) -> None:
    """Raise :class:`LimitExceeded` naming ``what`` when ``value`` is over ``limit``."""
    if value > limit:
        raise LimitExceeded(f"{what} is {value}; the limit for your group is {limit}")
