"""Published checkpoints of each dense family, imported with ``tpm-faas models add`` and served
by a real shard group, answer all three modes through the gateway — chat included — exactly
as ``transformers`` computes them with the checkpoint's own tokenizer and chat template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from _published import STYLE_OF, published
from click.testing import CliRunner
from transformers import AutoTokenizer

from tpm_faas.cli import main
from tpm_faas.client import TPMClient
from tpm_faas.config import POLICIES, Settings
from tpm_faas.errors import RemoteError
from tpm_faas.gateway.ledger import Ledger
from tpm_faas.gateway.pipeline import Gateway
from tpm_faas.launcher import ShardGroup
from tpm_faas.testing import InProcessTransport
from tpm_faas.testing.embedded import DEV_USERS, write_dev_tokens

pytestmark = pytest.mark.integration

FAMILIES = sorted(STYLE_OF)
CHAT = [
    {"role": "user", "content": "Who divided the light from the darkness?"},
]
PROMPTS = ["And God said, Let there be light", "In the beginning"]
NEW = 10


def _ref(family: str) -> str:
    return f"tiny-{family.replace('.', '-')}@1"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every family's checkpoint imported into one model root, and a site that may serve
    them (a policy naming them, dev tokens, a funded ledger)."""
    base = tmp_path_factory.mktemp("published-site")
    root, home = base / "models", base / "home"
    models = {}
    for family in FAMILIES:
        src = base / "hub" / family
        models[family] = published(family, src)
        out = CliRunner().invoke(
            main, ["models", "add", str(src), _ref(family), "--root", str(root)]
        )
        assert out.exit_code == 0, out.output
    policy = yaml.safe_load((POLICIES / "local-dev.yaml").read_text())
    rates = next(iter(policy["models"].values()))
    policy["models"] = {_ref(f): rates for f in FAMILIES}
    for group in policy["groups"]:
        group["models"] = [_ref(f) for f in FAMILIES]
    (base / "policy.yaml").write_text(yaml.safe_dump(policy))
    settings = Settings.from_env(
        {
            "TPM_FAAS_MODELS": str(root),
            "TPM_FAAS_POLICY": str(base / "policy.yaml"),
            "TPM_FAAS_DEV_TOKENS": str(home / "tokens.yaml"),
            "TPM_FAAS_HOME": str(home),
        }
    )
    tokens = write_dev_tokens(home / "tokens.yaml")
    ledger = Ledger(settings.ledger_url)
    for user in DEV_USERS.values():
        ledger.credit(user.project, round(user.su * 1e6), reference=f"seed:{user.project}")
    ledger.close()
    return {"settings": settings, "tokens": tokens, "models": models, "root": root}


@pytest.fixture(scope="module", params=FAMILIES)
def served(request: pytest.FixtureRequest, site: dict[str, Any]) -> Iterator[dict[str, Any]]:
    family: str = request.param
    settings: Settings = site["settings"]
    group = ShardGroup(_ref(family), 1, settings, settings.home / "runs" / family)
    group.start()
    try:
        client = TPMClient(
            InProcessTransport(Gateway.from_settings(settings)),
            token=site["tokens"]["dev"],
            model=_ref(family),
        )
        directory = site["root"] / _ref(family).replace("@", "/")
        yield {
            "family": family,
            "client": client,
            "model": site["models"][family],
            "tok": AutoTokenizer.from_pretrained(directory),
        }
    finally:
        group.stop()


def _greedy(model: Any, ids: list[int], eos: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
    return [int(t) for t in out[0, len(ids) :]]


def _eos(model: Any) -> list[int]:
    e = model.generation_config.eos_token_id
    return list(e) if isinstance(e, list) else [e]


def _token_text(tok: Any, token_id: int) -> str:
    if token_id >= len(tok):  # an embedding row past the tokenizer's ids (padding)
        return f"<{token_id}>"
    text = tok.decode([token_id])
    return text if text and "\ufffd" not in text else tok.convert_ids_to_tokens(token_id)


def test_chat_query_equals_transformers(served: dict[str, Any]) -> None:
    client, model, tok = served["client"], served["model"], served["tok"]
    if served["family"] == "gpt2":  # no chat template: a clear refusal, nothing charged
        with pytest.raises(RemoteError, match="no chat template") as e:
            client.generate(messages=CHAT, max_new_tokens=NEW)
        assert e.value.code == "bad_request"
        return
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    r = client.generate(messages=CHAT, max_new_tokens=NEW, logprobs=True)
    (c,) = r.output.completions
    assert c.prompt_tokens == len(ids) == r.usage.input_tokens
    assert c.token_ids == _greedy(model, ids, _eos(model))
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    assert c.finish_reason == ("stop" if c.token_ids[-1] in _eos(model) else "length")
    assert c.logprobs is not None
    assert [e["token"] for e in c.logprobs] == [_token_text(tok, t) for t in c.token_ids]


def test_prompt_query_and_stop_string(served: dict[str, Any]) -> None:
    client, model, tok = served["client"], served["model"], served["tok"]
    r = client.generate(PROMPTS, max_new_tokens=NEW)
    for prompt, c in zip(PROMPTS, r.output.completions, strict=True):
        ids = tok(prompt)["input_ids"]
        assert c.prompt_tokens == len(ids)
        assert c.token_ids == _greedy(model, ids, _eos(model))
    # A stop string taken from the middle of the greedy text ends generation there.
    full = r.output.completions[0]
    clean = full.text.split("\ufffd")[-1]  # text after the last undecodable byte
    if len(clean) < 2:
        pytest.skip(f"the random model's text has nothing to cut: {full.text!r}")
    stop = clean[len(clean) // 2 :][:2]
    cut = client.generate(PROMPTS[0], max_new_tokens=NEW, stop=[stop]).output.completions[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert cut.completion_tokens <= full.completion_tokens


def test_text_embed_equals_transformers(served: dict[str, Any]) -> None:
    client, model, tok = served["client"], served["model"], served["tok"]
    r = client.embed(prompts=PROMPTS, pooling="mean")
    got = r.tensor()
    assert got.shape == (2, model.get_input_embeddings().weight.shape[1])
    for row, prompt in zip(got, PROMPTS, strict=True):
        with torch.no_grad():
            hidden = model.base_model(torch.tensor([tok(prompt)["input_ids"]])).last_hidden_state
        np.testing.assert_allclose(row, hidden[0].mean(0).numpy(), atol=1e-4, rtol=1e-4)
    assert r.usage.input_tokens == sum(len(tok(p)["input_ids"]) for p in PROMPTS)


def test_intervene_reads_sites_and_names_real_tokens(served: dict[str, Any]) -> None:
    client, model, tok = served["client"], served["model"], served["tok"]
    chat = served["family"] != "gpt2"
    if chat:
        ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        kwargs: dict[str, Any] = {"messages": CHAT}
    else:
        ids = tok(PROMPTS[0])["input_ids"]
        kwargs = {"prompts": PROMPTS[0]}
    ops = [
        {"op": "save", "site": "blocks.0.hook_resid_post"},
        {"op": "logit_lens", "layers": [0], "positions": [-1], "top_k": 3},
    ]
    r = client.intervene(kwargs.pop("prompts", None), ops, **kwargs)
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(
        r.saved["blocks.0.hook_resid_post"], states[1][0].numpy(), atol=1e-4, rtol=1e-4
    )
    (row,) = r.logit_lens
    assert row["input_token"] == _token_text(tok, ids[-1])
    assert all(e["token"] == _token_text(tok, e["id"]) for e in row["top"])
    assert json.dumps(row)  # plain JSON
