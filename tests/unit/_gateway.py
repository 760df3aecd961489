"""A gateway on real site components (dev tokens, policy file, SQLite ledger and its rate-limit
buckets, registry) whose shard group address answers nothing: an admitted request fails at
the shard and must be voided."""

from __future__ import annotations

from pathlib import Path

from tpm_faas.config import SOURCE_POLICIES, Settings
from tpm_faas.gateway.ledger import Ledger
from tpm_faas.gateway.pipeline import Gateway
from tpm_faas.registry import GroupEntry, ModelInfo, Registry
from tpm_faas.testing.embedded import DEV_USERS, write_dev_tokens

DEMO_INFO = ModelInfo(
    name="demo-tpm@1",
    hidden_size=256,
    num_layers=4,
    vocab_size=264,
    max_positions=512,
    tokenizer="bytes",
    checkpoint_sha256="0" * 64,
    dtype="float32",
    architecture="llama",
    num_heads=8,
    head_dim=32,
)


def dead_shard_gateway(
    home: Path, policy: Path = SOURCE_POLICIES / "local-dev.yaml"
) -> tuple[Gateway, dict[str, str]]:
    """The gateway and the dev users' tokens (their projects credited as in the demo)."""
    settings = Settings.from_env(
        {
            "TPM_FAAS_HOME": str(home),
            "TPM_FAAS_DEV_TOKENS": str(home / "tokens.yaml"),
            "TPM_FAAS_POLICY": str(policy),
        },
        shard_timeout_s=0.05,
    )
    tokens = write_dev_tokens(home / "tokens.yaml")
    ledger = Ledger(settings.ledger_url)
    for user in DEV_USERS.values():
        ledger.credit(user.project, round(user.su * 1e6), reference=f"seed:{user.project}")
    ledger.close()
    Registry(settings.registry_dir).register(
        GroupEntry(
            model=DEMO_INFO,
            address="tcp://127.0.0.1:9",
            tp_size=1,
            pid=0,
            host="localhost",
            started_at=0.0,
        )
    )
    return Gateway.from_settings(settings), tokens
