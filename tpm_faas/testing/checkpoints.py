"""Small checkpoints in the published Hugging Face layout, for tests and the demo.

No model hub here: :func:`train_tokenizer` trains a byte-level BPE tokenizer with Hugging
Face ``tokenizers`` on the bundled corpus and writes it as checkpoints ship theirs
(``tokenizer.json``, ``tokenizer_config.json`` with the chat template, special tokens), in
one of the chat styles of the published families; :func:`write_checkpoint` saves a
``transformers`` model beside it with its ``generation_config.json``. The result is what
``tpm-faas models add`` imports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpm_faas.config import package_data

#: Chat templates in the published families' styles (the published ones, without tool use).
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class ChatStyle:
    """Special tokens and chat template of one family's tokenizer."""

    specials: tuple[str, ...]
    bos: str | None
    eos: str
    #: Ids generation stops at (``generation_config.json``'s ``eos_token_id``), by text.
    stop: tuple[str, ...]
    template: str | None


STYLES = {
    "llama3": ChatStyle(
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        "<|begin_of_text|>",
        "<|end_of_text|>",
        ("<|end_of_text|>", "<|eot_id|>"),
        LLAMA3_TEMPLATE,
    ),
    "chatml": ChatStyle(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None,
        "<|endoftext|>",
        ("<|im_end|>", "<|endoftext|>"),
        CHATML_TEMPLATE,
    ),
    "mistral": ChatStyle(
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", ("</s>",), MISTRAL_TEMPLATE
    ),
    "gpt2": ChatStyle(
        ("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>", ("<|endoftext|>",), None
    ),
}


def corpus_text() -> str:
    """The bundled training corpus."""
    return "".join(p.read_text() for p in sorted(package_data("corpus").glob("*.txt")))


def train_tokenizer(
    out_dir: Path, style: str = "llama3", *, vocab_size: int = 512
) -> dict[str, int]:
    """Train a byte-level BPE tokenizer on the bundled corpus and save it in ``out_dir`` as a
    checkpoint of ``style`` ships it; returns the special tokens' ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    chat = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(chat.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    ids = {s: int(i) for s in chat.specials if (i := tok.token_to_id(s)) is not None}
    if chat.bos is not None and style != "gpt2":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{chat.bos} $A",
            pair=f"{chat.bos} $A {chat.bos} $B",
            special_tokens=[(chat.bos, ids[chat.bos])],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 20,
        "eos_token": chat.eos,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(ids[s]): {
                "content": s,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for s in chat.specials
        },
    }
    if chat.bos is not None:
        config["bos_token"] = chat.bos
    if chat.template is not None:
        config["chat_template"] = chat.template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ids


def write_checkpoint(model: Any, out_dir: Path, style: str = "llama3") -> None:
    """Save ``model`` (a ``transformers`` ``*ForCausalLM``) in ``out_dir`` beside a tokenizer
    of ``style`` already there (:func:`train_tokenizer`): safetensors weights, ``config.json``
    and a ``generation_config.json`` naming the style's end-of-turn ids."""
    chat = STYLES[style]
    cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    ids = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
    model.save_pretrained(out_dir, safe_serialization=True)
    generation: dict[str, Any] = {"eos_token_id": [ids[s] for s in chat.stop]}
    if chat.bos is not None:
        generation["bos_token_id"] = ids[chat.bos]
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
