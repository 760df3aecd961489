"""A gateway on real site components (dev tokens, policy file, SQLite ledger and its rate-limit
buckets, registry) whose shard group never answers: an admitted request fails at the shard
and must be voided."""

from __future__ import annotations

from pathlib import Path

from tpm_faas.config import POLICIES
from tpm_faas.errors import ShardTimeout
from tpm_faas.gateway.pipeline import Gateway
from tpm_faas.testing import FAKE_MODEL, FakeShard, fake_site

DEMO_INFO = FAKE_MODEL


def dead_shard_gateway(
    home: Path, policy: Path = POLICIES / "local-dev.yaml"
) -> tuple[Gateway, dict[str, str]]:
    """The gateway and the dev users' tokens (their projects credited as in the demo)."""
    silent = FakeShard(fail=ShardTimeout("the shard group did not answer within 0 s"))
    gateway, tokens, _ = fake_site(home, policy, shard=silent)
    return gateway, tokens
