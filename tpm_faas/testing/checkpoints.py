"""Small checkpoints in the published Hugging Face layout, for tests and the demo.

No model hub here: :func:`train_tokenizer` trains a byte-level BPE tokenizer with Hugging
Face ``tokenizers`` on the bundled corpus and writes it as checkpoints ship theirs
(``tokenizer.json``, ``tokenizer_config.json`` with the chat template, special tokens), in
one of the chat styles of the published families; :func:`write_checkpoint` saves a
``transformers`` model beside it with its ``generation_config.json``. The result is what
``tpm-faas models add`` imports. :func:`write_fp8_checkpoint` turns a saved checkpoint into
the block-scaled FP8 layout DeepSeek-V3 and Kimi K2 are published in.
"""

from __future__ import annotations

import json
import re
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


# -- FP8 block-scaled checkpoints (DeepSeek-V3, Kimi K2) ----------------------------------------
#: ``config.json``'s ``quantization_config`` of DeepSeek-V3's and Kimi K2's FP8 checkpoints.
FP8_QUANTIZATION: dict[str, Any] = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
#: The largest finite e4m3 value: a block's largest magnitude maps to it.
FP8_MAX = 448.0
#: The weights DeepSeek-V3 publishes in FP8: every projection of attention and of the MLPs
#: (dense, shared and per-expert ``model.layers.3.mlp.experts.7.down_proj.weight``). Not FP8:
#: embeddings, ``lm_head``, norms, the router's ``mlp.gate.weight`` and its
#: ``e_score_correction_bias``.
FP8_WEIGHTS = re.compile(r"model\.layers\.\d+\.(?:self_attn|mlp)\.(?:[\w.]+\.)?\w*_proj\w*\.weight")


def fp8_quantize(weight: Any, block: tuple[int, int] = (128, 128)) -> tuple[Any, Any]:
    """A 2-D weight in FP8 blocks: ``(e4m3 weight, float32 weight_scale_inv)``, the scale of
    each ``block`` (the last ones along a dimension partial) its largest magnitude / 448, so
    that ``e4m3 * scale`` (broadcast over the block) is the weight within e4m3's rounding."""
    import torch

    w = weight.detach().to(torch.float32)
    rows, cols = w.shape
    scale_rows, scale_cols = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(scale_rows * block[0], scale_cols * block[1])
    padded[:rows, :cols] = w
    amax = padded.reshape(scale_rows, block[0], scale_cols, block[1]).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand(scale, block, rows, cols)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale


def fp8_dequantize(q: Any, scale: Any, block: tuple[int, int] = (128, 128)) -> Any:
    """The float32 weight of an FP8 one: ``q.float() * scale`` over its blocks."""
    import torch

    rows, cols = q.shape
    return q.to(torch.float32) * _expand(scale.to(torch.float32), block, rows, cols)


def _expand(scale: Any, block: tuple[int, int], rows: int, cols: int) -> Any:
    full = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[:rows, :cols]


def write_fp8_checkpoint(out_dir: Path) -> dict[str, Any]:
    """Rewrite the checkpoint in ``out_dir`` (``save_pretrained``'s, in the published
    per-expert layout) as DeepSeek-V3 and Kimi K2 publish theirs: each weight
    :data:`FP8_WEIGHTS` names in e4m3 with its ``<name>_scale_inv`` (:func:`fp8_quantize`),
    every other tensor as it was, and :data:`FP8_QUANTIZATION` in ``config.json``. Returns
    the weights the checkpoint now holds, dequantized (float32, by checkpoint name): what a
    float checkpoint of the same model holds."""
    from safetensors.torch import load_file, save_file

    dequantized: dict[str, Any] = {}
    index: dict[str, str] = {}
    total = 0
    for path in sorted(out_dir.glob("model*.safetensors")):
        tensors = load_file(str(path))
        out: dict[str, Any] = {}
        for name, t in tensors.items():
            if FP8_WEIGHTS.fullmatch(name) and t.dim() == 2:
                q, scale = fp8_quantize(t)
                out[name], out[name + "_scale_inv"] = q, scale
                dequantized[name] = fp8_dequantize(q, scale)
            else:
                out[name] = t.contiguous()
        save_file(out, str(path), metadata={"format": "pt"})
        index.update(dict.fromkeys(out, path.name))
        total += sum(t.numel() * t.element_size() for t in out.values())
    index_path = out_dir / "model.safetensors.index.json"
    if index_path.is_file():
        data = json.loads(index_path.read_text())
        data["weight_map"] = dict(sorted(index.items()))
        data.setdefault("metadata", {})["total_size"] = total
        index_path.write_text(json.dumps(data, indent=2) + "\n")
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = dict(FP8_QUANTIZATION)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return dequantized
