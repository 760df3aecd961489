"""The checkpoints' own tokenizers equal ``transformers``' for the same files (ids, text, chat
prompts), decoding piece by piece is correct across split characters, and the pricing
bounds hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tpm_faas.errors import ConfigError, RequestError
from tpm_faas.testing.checkpoints import STYLES, train_tokenizer
from tpm_faas.tokenizer import ByteTokenizer, HFTokenizer, find_stop, load_tokenizer

TEXTS = [
    "And God said, Let there be light: and there was light.",
    "héllo wörld — 世界 🙂 naïve café",
    "  leading spaces, tabs\tand\nnewlines  ",
    "<|eot_id|> special-looking text [INST]",
]
CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Who divided the light from the darkness?"},
    {"role": "assistant", "content": "God."},
    {"role": "user", "content": "On which day? 🙂"},
]


@pytest.fixture(scope="module", params=sorted(STYLES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp(request.param)
    train_tokenizer(d, request.param)
    (d / "config.json").write_text(json.dumps({"vocab_size": 520}))
    return d


def test_ids_and_text_equal_transformers(checkpoint: Path) -> None:
    ours = HFTokenizer(checkpoint, vocab_size=520)
    theirs = AutoTokenizer.from_pretrained(checkpoint)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"]
        assert (
            ours.encode(text, add_special=False)
            == theirs(text, add_special_tokens=False)["input_ids"]
        )
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_chat_prompt_equals_apply_chat_template(checkpoint: Path) -> None:
    ours = HFTokenizer(checkpoint, vocab_size=520)
    theirs = AutoTokenizer.from_pretrained(checkpoint)
    if ours.chat_template is None:
        with pytest.raises(RequestError, match="no chat template"):
            ours.encode_chat(CHAT)
        return
    chat = CHAT[1:] if "[INST]" in ours.chat_template else CHAT  # Mistral: no system turn
    for generation_prompt in (True, False):
        text = ours.render_chat(chat, add_generation_prompt=generation_prompt)
        assert text == theirs.apply_chat_template(
            chat, add_generation_prompt=generation_prompt, tokenize=False
        )
        ids = theirs.apply_chat_template(
            chat, add_generation_prompt=generation_prompt, tokenize=True
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert ours.encode_chat(chat, add_generation_prompt=generation_prompt) == list(ids)


def test_template_refusal_is_a_request_error(tmp_path: Path) -> None:
    train_tokenizer(tmp_path, "mistral")
    tok = HFTokenizer(tmp_path)
    with pytest.raises(RequestError, match="roles must alternate"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_detokenizer_pieces_join_to_the_whole_text(checkpoint: Path) -> None:
    for tok in (HFTokenizer(checkpoint, vocab_size=520), ByteTokenizer()):
        for text in TEXTS:
            ids = tok.encode(text, add_special=False)
            det = tok.detokenizer()
            pieces = [det.push(i) for i in ids]
            assert "".join(pieces) == det.text == tok.decode(ids)
            assert all("\ufffd" not in p for p in pieces)  # no half characters shown


def test_multibyte_character_is_held_until_complete() -> None:
    tok = ByteTokenizer()
    det = tok.detokenizer()
    ids = tok.encode("🙂", add_special=False)  # four bytes, four tokens
    assert [det.push(i) for i in ids] == ["", "", "", "🙂"]


def test_token_strings_name_real_vocabulary_entries(checkpoint: Path) -> None:
    tok = HFTokenizer(checkpoint, vocab_size=520)
    ids = tok.encode("And God said", add_special=False)
    assert "".join(tok.token_str(i) for i in ids) == "And God said"
    # An id the model embeds but the tokenizer does not know (padding rows).
    assert tok.token_str(519) == "<519>"
    assert tok.token_str_json_max >= max(len(json.dumps(tok.token_str(i))) for i in range(520))


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 519), min_size=1, max_size=40))
def test_text_json_bound_holds_for_any_ids(ids: list[int]) -> None:
    tok = _shared_tokenizer()
    text = tok.decode(ids)
    assert len(json.dumps(text)) - 2 <= tok.text_json_per_token * len(ids)


def test_byte_text_json_bound_holds() -> None:
    tok = ByteTokenizer()
    worst = [0xF0, 0x9F, 0x99, 0x82, 0x01, 0xFF, 0xE4]  # a 4-byte char, a control, invalid
    assert len(json.dumps(tok.decode(worst))) - 2 <= tok.text_json_per_token * len(worst)


_CACHE: dict[str, HFTokenizer] = {}


def _shared_tokenizer() -> HFTokenizer:
    if "tok" not in _CACHE:
        import tempfile

        d = Path(tempfile.mkdtemp())
        train_tokenizer(d, "llama3")
        _CACHE["tok"] = HFTokenizer(d, vocab_size=520)
    return _CACHE["tok"]


def test_find_stop() -> None:
    assert find_stop("abc STOP def", ["STOP", "def"]) == 4
    assert find_stop("abc", ["x", ""]) == -1
    assert find_stop("a.b.", ["."], start=2) == 3


def test_missing_or_bad_tokenizer_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        load_tokenizer("hf", tmp_path, vocab_size=10)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a tokenizers file"):
        HFTokenizer(tmp_path)
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        load_tokenizer("sentencepiece", tmp_path, vocab_size=10)
