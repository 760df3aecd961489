"""Every served family (Llama 2/3, Llama 3.1 with ``llama3`` RoPE scaling, Mistral, Qwen2,
Qwen3, GPT-2) through the serving runtime equals ``transformers``.

The models are tiny random-weight ones with awkward shapes (:mod:`_families`: grouped-query
attention, ``head_dim`` unequal to ``hidden / heads``, tied and untied embeddings, every norm
weight and bias drawn). The runtime is the one rank 0 runs: :class:`Scheduler` over
:class:`Decoder` with its KV cache; the reference is the same ``transformers`` model's
``generate()`` (greedy) and its modules' outputs under hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _families import FAMILIES, random_model, save_checkpoint
from _reference import normalise, reference_values, run

from tpm_faas.architectures import SUPPORTED, dims
from tpm_faas.client import decode_array
from tpm_faas.errors import ConfigError, LimitExceeded, UnsupportedArchitecture
from tpm_faas.runtime.arch import ARCHES, Qwen3Arch, arch_for
from tpm_faas.runtime.decoder import Decoder
from tpm_faas.runtime.model_store import check_tp
from tpm_faas.sites import ModelShape, all_sites
from tpm_faas.tokenizer import ByteTokenizer

ATOL, RTOL = 2e-5, 1e-4
TOK = ByteTokenizer()
PROMPT = "And God said, Let there be"
#: Prompts of different lengths, as token ids (BOS first, as the byte tokenizer encodes).
PROMPTS = [
    TOK.encode("In the beginning"),
    TOK.encode("And God said, Let there be light: and there was light."),
    TOK.encode("Now"),
    [TOK.bos_id, 7, 200, 31, 31, 99, 250, 1],  # any ids, not only text
]
NEW = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads; on a shared machine, spinning OpenMP threads
    make each step ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request: pytest.FixtureRequest) -> Any:
    return random_model(request.param)


def _decoder(model: Any, slots: int = 4) -> Decoder:
    return Decoder(model, slots=slots, max_len=96)


def _query(prompts: list[list[int]], new: int = NEW) -> dict[str, Any]:
    return {
        "prompt_ids": prompts,
        "max_new_tokens": new,
        "temperature": 0.0,
        "stop_at_eos": True,
        "logprobs": True,
    }


def _served(dec: Decoder, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each body's completions, all bodies submitted to one scheduler at once."""
    replies = run(dec, [("generate", b) for b in bodies], slots=dec.slots)
    out = []
    for i in range(len(bodies)):
        reply = replies[str(i)]
        assert reply["ok"], reply
        out.extend(reply["result"]["completions"])
    return out


def _generate(model: Any, ids: list[int], new: int) -> tuple[list[int], list[float]]:
    """``transformers``' greedy ``generate()``: the new tokens (up to and with EOS) and the
    log-probability of each."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = [int(t) for t in out.sequences[0, len(ids) :]]
    logps = [
        float(torch.log_softmax(step[0].float(), -1)[t])
        for step, t in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logps


def test_greedy_tokens_and_logprobs_equal_generate(model: Any) -> None:
    dec = _decoder(model)
    got = _served(dec, [_query([p]) for p in PROMPTS])
    for ids, c in zip(PROMPTS, got, strict=True):
        tokens, logps = _generate(model, ids, NEW)
        assert c["token_ids"] == tokens, ids
        mine = [e["logprob"] for e in c["logprobs"]]
        np.testing.assert_allclose(mine, logps, atol=1e-4, rtol=RTOL)


def test_batched_sequences_of_different_lengths_equal_one_at_a_time(model: Any) -> None:
    """The prompts submitted together (one decode step for sequences at different positions,
    in slots freed and reused in between: 4 prompts, 3 slots) give what each gives alone."""
    dec = _decoder(model, slots=3)
    prompts = [*PROMPTS, PROMPTS[1][:9]]
    together = _served(dec, [_query([p], new=NEW + i) for i, p in enumerate(prompts)])
    alone = [_served(dec, [_query([p], new=NEW + i)])[0] for i, p in enumerate(prompts)]
    for a, b in zip(together, alone, strict=True):
        assert a["token_ids"] == b["token_ids"]
        np.testing.assert_allclose(
            [e["logprob"] for e in a["logprobs"]], [e["logprob"] for e in b["logprobs"]], atol=1e-5
        )
    many = _served(dec, [_query(prompts)])  # one request of several prompts, too
    assert [c["token_ids"] for c in many] == [c["token_ids"][:NEW] for c in alone]


def _every_site_matches(model: Any, dec: Decoder) -> list[int]:
    """Save every canonical site of PROMPT through ``dec``, assert each equals the
    ``transformers`` module output; returns ``attn.hook_z``'s shape at layer 0."""
    shape = ModelShape.from_config(model.config.to_dict())
    sites = [s.name for s in all_sites(shape)]
    body = normalise(model, {"prompt": PROMPT, "ops": [{"op": "save", "site": s} for s in sites]})
    reply = run(dec, [("intervene", body)])["0"]
    assert reply["ok"], reply
    saved = reply["result"]["results"][0]["saved"]
    ref = reference_values(model, TOK.encode(PROMPT), sites)
    assert set(saved) == set(sites)
    for name in sites:
        got = decode_array(saved[name]["tensor"])
        assert got.shape == tuple(ref[name].shape), name
        np.testing.assert_allclose(got, ref[name].numpy(), atol=ATOL, rtol=RTOL, err_msg=name)
    z: list[int] = saved["blocks.0.attn.hook_z"]["tensor"]["shape"]
    return z


def test_every_site_equals_the_transformers_modules(model: Any) -> None:
    shape = ModelShape.from_config(model.config.to_dict())
    ids = TOK.encode(PROMPT)
    z = _every_site_matches(model, _decoder(model))
    assert z == [len(ids), shape.num_heads, shape.head_dim]


def test_the_shapes_are_the_awkward_ones(model: Any) -> None:
    """What the family fixtures promise, read off the loaded model (so the tests above
    exercise it): GQA, ``head_dim`` unequal to ``hidden / heads``, tying, RoPE scaling."""
    d = dims(model.config.to_dict())
    kind = model.config.model_type
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == d.tie_word_embeddings
    if kind == "gpt2":
        assert tied
        return
    arch = arch_for(model, 8)
    assert (arch.q_heads, arch.kv_heads) == (d.num_heads, d.num_kv_heads)
    if d.v_head_dim != d.head_dim:  # MLA (DeepSeek): each head its keys, wider than values
        assert d.num_heads == d.num_kv_heads and d.head_dim > d.v_head_dim
    else:
        assert d.num_heads > d.num_kv_heads > 1
    assert isinstance(arch, Qwen3Arch) == (kind == "qwen3")
    rope = model.config.rope_parameters
    if rope["rope_type"] == "llama3":
        default = 1.0 / rope["rope_theta"] ** (torch.arange(0, d.head_dim, 2).float() / d.head_dim)
        inv = model.model.rotary_emb.inv_freq
        assert not torch.allclose(inv, default) and torch.allclose(inv[0], default[0])
    elif kind in ("llama", "mistral", "qwen2", "qwen3"):
        assert d.head_dim * d.num_heads != d.hidden_size


def test_mistral_serves_within_its_sliding_window() -> None:
    """The serving context is the sliding window: full attention over the cache equals the
    model's windowed attention up to it, and a longer request is refused."""
    model = random_model("mistral")
    window = model.config.sliding_window
    dec = Decoder(model, slots=2, max_len=4 * window)
    assert dec.max_len == window
    ids = PROMPTS[1][:20]
    [c] = _served(dec, [_query([ids], new=window - len(ids))])
    tokens, _ = _generate(model, ids, window - len(ids))
    assert c["token_ids"] == tokens
    reply = run(dec, [("generate", _query([ids], new=window - len(ids) + 1))])["0"]
    assert not reply["ok"] and reply["error"]["code"] == LimitExceeded.code


def test_every_supported_architecture_has_a_block_mapping() -> None:
    assert set(ARCHES) == set(SUPPORTED)
    assert set(FAMILIES) >= set(SUPPORTED)  # and every one is tested above


def test_other_architectures_are_refused_naming_the_served_ones() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    model = GPTNeoXForCausalLM(cfg)  # type: ignore[no-untyped-call]
    with pytest.raises(UnsupportedArchitecture, match=r"supported: llama .*qwen3 .*gpt2"):
        Decoder(model, slots=1, max_len=8)


def test_rope_recomputed_from_the_sequence_length_is_refused() -> None:
    """``dynamic`` RoPE changes its frequencies with the length of the forward pass: a table
    computed once cannot equal it."""
    model = random_model(
        "llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}, num_hidden_layers=1
    )
    with pytest.raises(UnsupportedArchitecture, match="dynamic"):
        Decoder(model, slots=1, max_len=8)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tensor_parallel_is_refused_only_where_autotp_cannot_shard(
    tmp_path: Path, family: str
) -> None:
    config = FAMILIES[family]()
    config.save_pretrained(tmp_path)  # config.json is all check_tp reads
    check_tp(family, tmp_path, 1)
    if SUPPORTED[config.model_type].tensor_parallel:
        check_tp(family, tmp_path, 2)
    else:
        with pytest.raises(ConfigError, match="AutoTP does not shard; serve it with tp=1"):
            check_tp(family, tmp_path, 2)


def test_byte_card_only_when_asked_and_only_for_a_byte_vocabulary(tmp_path: Path) -> None:
    small = random_model(
        "qwen3", vocab_size=100, bos_token_id=None, eos_token_id=99, pad_token_id=None
    )
    plain = save_checkpoint(small, tmp_path / "plain")
    assert {p.name for p in plain.iterdir()} >= {"config.json", "model.safetensors"}
    assert not (plain / "tpm_model.json").exists()
    with pytest.raises(ValueError, match="264"):
        save_checkpoint(small, tmp_path / "card", byte_card=True)
    card = save_checkpoint(random_model("qwen3"), tmp_path / "card", byte_card=True)
    assert (card / "tpm_model.json").read_text().strip() == '{"tokenizer": "bytes"}'
