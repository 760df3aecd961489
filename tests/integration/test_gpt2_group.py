"""A GPT-2 model version served by a real shard group (Parsl-launched rank, DeepSpeed wrapped,
weights read from the checkpoint) equals plain ``transformers`` on the same checkpoint.

GPT-2 checkpoints tie the output embedding to ``transformer.wte`` (no ``lm_head.weight`` in
the file); DeepSpeed AutoTP does not shard GPT-2, so ``tp > 1`` is refused before any rank
starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from _models import random_gpt2

from tpm_faas.catalog import model_info
from tpm_faas.client import decode_array, encode_array
from tpm_faas.config import Settings
from tpm_faas.errors import ConfigError
from tpm_faas.launcher import ShardGroup
from tpm_faas.shard_client import ShardClient
from tpm_faas.tokenizer import ByteTokenizer

pytestmark = pytest.mark.integration

NAME = "gpt2-random@1"
PROMPTS = ["And God said, Let there be", "In the beginning"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("models")
    model = random_gpt2()
    version = root / "gpt2-random" / "1"
    model.save_pretrained(version, safe_serialization=True)
    (version / "tpm_model.json").write_text('{"tokenizer": "bytes"}')  # byte-level ids
    home = tmp_path_factory.mktemp("home")
    settings = Settings.from_env({"TPM_FAAS_MODELS": str(root)}, home=home)
    group = ShardGroup(NAME, 1, settings, home / "runs")
    group.start()
    try:
        yield {"client": group.client(), "model": model, "settings": settings, "dir": version}
    finally:
        group.stop()


def _reference(model: Any, prompt: str, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Each block's output (resid_post) over the prompt, and greedy tokens, from plain HF."""
    ids = torch.tensor([ByteTokenizer().encode(prompt)])
    outs: list[torch.Tensor] = []

    def keep(_m: Any, _i: Any, o: Any) -> None:  # a block returns a tensor or a tuple
        outs.append((o[0] if isinstance(o, tuple) else o)[0].detach().clone())

    handles = [b.register_forward_hook(keep) for b in model.transformer.h]
    with torch.no_grad():
        model(ids)
        for h in handles:
            h.remove()
        tokens = []
        for _ in range(steps):
            nxt = int(model(ids).logits[0, -1].argmax())
            tokens.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return outs, tokens


def test_sites_and_greedy_tokens_equal_transformers(served: dict[str, Any]) -> None:
    from tpm_faas.modes import MODES
    from tpm_faas.policy import Limits
    from tpm_faas.protocol.requests import InterveneRequest

    info = model_info(NAME, served["dir"])
    assert info.architecture == "gpt2" and info.num_heads == 4
    req = InterveneRequest.model_validate(
        {
            "model": NAME,
            "prompts": PROMPTS,
            "ops": [{"op": "save", "site": "hook_resid_post", "layers": "*"}],
            "max_new_tokens": 6,
            "stop_at_eos": False,
        }
    )
    body = MODES["intervene"].admit(req, info, Limits(max_bytes_returned=1 << 26)).body
    client: ShardClient = served["client"]
    out = client.call("intervene", body)["results"]
    for p, prompt in enumerate(PROMPTS):
        resid, tokens = _reference(served["model"], prompt, 6)
        assert out[p]["token_ids"] == tokens
        for i, want in enumerate(resid):
            got = decode_array(out[p]["saved"][f"blocks.{i}.hook_resid_post"]["tensor"])
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_embed_equals_transformers(served: dict[str, Any]) -> None:
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    out = served["client"].call("embed", {"inputs_embeds": encode_array(x), "pooling": "mean"})
    with torch.no_grad():
        want = served["model"].transformer(inputs_embeds=torch.from_numpy(x)).last_hidden_state
    np.testing.assert_allclose(decode_array(out["output"]), want.mean(1).numpy(), atol=1e-5)


def test_tensor_parallel_gpt2_is_refused_before_any_rank_starts(served: dict[str, Any]) -> None:
    settings: Settings = served["settings"]
    run_dir = settings.home / "runs-tp2"
    with pytest.raises(ConfigError, match="AutoTP does not shard; serve it with tp=1"):
        ShardGroup(NAME, 2, settings, run_dir).start()
    assert not run_dir.exists()
