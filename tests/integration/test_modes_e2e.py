"""All three modes through the whole real path: client → GlobusComputeEngine task → gateway
(auth, policy, ledger) → Parsl-launched shard group → result with usage and receipt."""

from __future__ import annotations

import numpy as np
import pytest

from tpm_faas.errors import RemoteError
from tpm_faas.testing.embedded import EmbeddedSite

pytestmark = pytest.mark.integration

PROMPT = "And God said, Let there be"


def test_query_greedy_is_deterministic_and_charged(site: EmbeddedSite) -> None:
    c = site.client()
    a = c.generate(PROMPT, max_new_tokens=24, logprobs=True)
    b = c.generate(PROMPT, max_new_tokens=24)
    assert a.text == b.text and len(a.text) > 0
    comp = a.output["completions"][0]
    assert comp["completion_tokens"] == 24 and len(comp["logprobs"]) == 24
    assert all(e["logprob"] <= 0 for e in comp["logprobs"])
    assert a.usage["su"] > 0 and a.usage["su"] <= a.usage["su_held"]
    assert a.usage["input_tokens"] == len(PROMPT.encode()) + 1 and a.usage["output_tokens"] == 24
    r = a.receipt
    assert len(r["checkpoint_sha256"]) == 64 and len(r["request_sha256"]) == 64
    assert r["seed"] == 0 and r["tp_size"] == 1
    t = a.usage["timing"]
    assert t["ttft_s"] >= t["queue_s"] >= 0 and t["decode_tok_s"] > 0 and t["max_batch"] >= 1
    assert {"torch", "transformers", "deepspeed", "tpm-faas"} <= set(r["versions"])


def test_query_sampling_is_seeded(site: EmbeddedSite) -> None:
    c = site.client()
    kw = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9}
    a = c.generate(PROMPT, seed=7, **kw)
    b = c.generate(PROMPT, seed=7, **kw)
    texts = {c.generate(PROMPT, seed=s, **kw).text for s in range(4)}
    assert a.text == b.text
    assert len(texts) > 1


def test_query_several_prompts(site: EmbeddedSite) -> None:
    r = site.client().generate(["In the beginning", "And Abraham"], max_new_tokens=8)
    assert len(r.texts) == 2 and r.usage["output_tokens"] == 16


def test_embed_adapter_and_head(site: EmbeddedSite) -> None:
    feats = np.random.default_rng(0).standard_normal((3, 4, 16)).astype(np.float32)
    r = site.client().embed(adapter="features-linear", adapter_input=feats, head="regression")
    out = r.tensor()
    assert out.shape == (3, 1) and np.isfinite(out).all()
    assert r.usage["input_tokens"] == 12 and r.usage["su"] > 0


def test_embed_inputs_embeds_pooled(site: EmbeddedSite) -> None:
    x = np.random.default_rng(1).standard_normal((2, 5, 256)).astype(np.float32)
    mean = site.client().embed(x).tensor()
    last = site.client().embed(x, pooling="last").tensor()
    assert mean.shape == last.shape == (2, 256)
    assert not np.allclose(mean, last)


def test_intervene_logit_lens_matches_generation(site: EmbeddedSite) -> None:
    c = site.client()
    greedy = c.generate(PROMPT, max_new_tokens=1).output["completions"][0]["token_ids"][0]
    r = c.intervene(
        PROMPT,
        [
            {"op": "logit_lens", "layers": "*", "top_k": 3},
            {"op": "save", "site": "hook_resid_post", "layers": [0, 3], "positions": [-1, 0]},
        ],
    )
    table = r.logit_lens
    assert [row["layer"] for row in table] == [0, 1, 2, 3]
    # The lens at the last layer is the model's own next-token distribution.
    assert table[-1]["top"][0]["id"] == greedy
    saved = r.saved
    assert set(saved) == {"blocks.0.hook_resid_post", "blocks.3.hook_resid_post"}
    assert saved["blocks.3.hook_resid_post"].shape == (2, 256)
    # Rows in the order asked: position -1 (the last, 26), then 0.
    assert r.output["results"][0]["saved"]["blocks.0.hook_resid_post"]["positions"] == [26, 0]
    assert r.usage["hooked_sites"] == 4
    assert len(r.receipt["intervention_sha256"]) == 64


def test_intervene_steering_changes_the_output(site: EmbeddedSite) -> None:
    c = site.client()
    plain = c.intervene(
        PROMPT,
        [{"op": "save", "site": "hook_resid_post", "layers": [1], "positions": [-1]}],
        max_new_tokens=24,
    )
    vec = (
        c.intervene("Egypt, Egypt, Egypt", [{"op": "save", "site": "blocks.1.hook_resid_post"}])
        .saved["blocks.1.hook_resid_post"]
        .mean(0)
    )
    site_ = "blocks.1.hook_resid_post"
    zero = c.intervene(
        PROMPT,
        [{"op": "add", "site": site_, "vector": np.zeros_like(vec), "generation": True}],
        max_new_tokens=24,
    )
    steered = c.intervene(
        PROMPT,
        [{"op": "add", "site": site_, "vector": vec, "scale": 1.5, "generation": True}],
        max_new_tokens=24,
    )
    assert zero.text == plain.text == c.generate(PROMPT, max_new_tokens=24).text
    assert steered.text != plain.text
    assert steered.usage["output_tokens"] == 24


def test_intervene_large_result_comes_by_reference(site: EmbeddedSite) -> None:
    """Over the inline limit, saved tensors go to a safetensors file (sha256 in the result);
    the client loads them transparently and they equal the inline values."""
    c = site.client()
    ops = [
        {"op": "save", "site": "unembed"},
        {"op": "save", "site": "hook_resid_post", "layers": "*"},
        {"op": "save", "site": "hook_mlp_out", "layers": "*"},
        {"op": "save", "site": "attn.hook_z", "layers": "*"},
    ]
    prompts = [PROMPT * 12, PROMPT]  # 313 tokens x (264 + 12 x 256) floats: about 4.2 MB
    limit = site.settings.inline_limit_bytes
    big = c.intervene(prompts, ops)
    ref = big.output["tensors_ref"]
    assert ref["bytes"] > 0 and len(ref["sha256"]) == 64
    assert all("data" not in v["tensor"] for v in big.output["results"][0]["saved"].values())
    small = c.intervene(PROMPT, ops)
    assert "tensors_ref" not in small.output
    for name, arr in small.saved.items():
        np.testing.assert_array_equal(big.saved_for(1)[name], arr)
    assert big.saved["unembed"].shape == (len(PROMPT.encode()) * 12 + 1, 264)
    assert big.usage["bytes_returned"] >= ref["bytes"] > limit

    # A later request patches with those activations by reference: the site reads them from
    # its results directory (sha256-pinned); the same as sending them inline.
    other = "Now Moses said, Let it now"  # as many tokens as PROMPT (byte tokenizer)
    site_ = "blocks.1.hook_resid_post"
    patch = [
        {"op": "set", "site": site_, "value": {"ref": "acts"}},
        {"op": "save", "site": "unembed"},
    ]
    by_ref = c.intervene(other, patch, tensors={"acts": big.saved_ref(site_, prompt=1)})
    inline = c.intervene(other, patch, tensors={"acts": big.saved_for(1)[site_]})
    np.testing.assert_array_equal(by_ref.saved["unembed"], inline.saved["unembed"])
    # layer 1's whole residual stream is PROMPT's, so everything after it is PROMPT's
    np.testing.assert_allclose(by_ref.saved["unembed"], small.saved["unembed"], atol=1e-5)
    assert by_ref.receipt["request_sha256"] != inline.receipt["request_sha256"]
    stale = {**big.saved_ref(site_, prompt=1), "sha256": "0" * 64}
    with pytest.raises(RemoteError, match="sha256") as info:
        c.intervene(other, patch, tensors={"acts": stale})
    assert info.value.code == "bad_tensor" and info.value.remote_layer == "request"


def test_ledger_records_every_charge_and_no_open_hold(site: EmbeddedSite) -> None:
    c = site.client()
    ledger = site.ledger()
    before = ledger.balance("demo")
    r = c.generate("And", max_new_tokens=4)
    after = ledger.balance("demo")
    assert after.charged - before.charged == round(r.usage["su"] * 1e6)
    assert ledger.open_holds() == []
    assert r.request_id in {row["request_id"] for row in ledger.charges("demo")}
    ledger.close()


def test_served_model_matches_the_checkpoint(site: EmbeddedSite) -> None:
    """The shard group (meta init + shard loading + our decoder) generates exactly what plain
    ``transformers`` generates from the same checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from tpm_faas.config import BUNDLED_MODELS
    from tpm_faas.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ref = AutoModelForCausalLM.from_pretrained(BUNDLED_MODELS / "demo-tpm" / "1").eval()
    ids = tok.encode(PROMPT)
    out = ref.generate(
        torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_id
    )
    served = site.client().generate(PROMPT, max_new_tokens=32).output["completions"][0]
    assert served["token_ids"] == out[0, len(ids) :].tolist()
