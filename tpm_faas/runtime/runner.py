"""The model of one rank and the three things it does: generate, embed, intervene.

Every rank of a shard group runs the same calls with the same inputs in the same order
(tensor-parallel layers all-reduce inside the forward pass), so every rank computes the same
result; rank 0 returns it. Inputs here were validated and normalised by the gateway; this
module still checks what it indexes.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from tpm_faas.errors import RequestError, TensorError
from tpm_faas.registry import ModelInfo
from tpm_faas.runtime import model_store
from tpm_faas.runtime.scheduler import sample
from tpm_faas.tokenizer import ByteTokenizer

if TYPE_CHECKING:
    from tpm_faas.runtime.decoder import Decoder

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}


def decode_tensor(payload: dict[str, Any]) -> torch.Tensor:
    """A tensor from its JSON payload (declared dtype/shape; raw bytes; never a pickle)."""
    dtype = DTYPES.get(payload["dtype"])
    if dtype is None:
        raise TensorError(f"unsupported dtype {payload['dtype']!r}")
    shape = [int(s) for s in payload["shape"]]
    raw = base64.b64decode(payload["data"], validate=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != math.prod(shape) * itemsize:
        raise TensorError(f"tensor bytes ({len(raw)}) do not match shape {shape} of {dtype}")
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape).clone()


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    """A float32 tensor as a JSON payload."""
    t = t.detach().to(torch.float32).contiguous().cpu()
    return {
        "dtype": "float32",
        "shape": list(t.shape),
        "data": base64.b64encode(t.numpy().tobytes()).decode("ascii"),
    }


@dataclass
class LinearExtra:
    """A registered input adapter or output head: ``y = x @ weight.T + bias``."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(
            x.to(self.weight.device, self.weight.dtype), self.weight, self.bias
        )


class ModelRunner:
    """A loaded model (possibly a tensor-parallel shard) and its registered extras."""

    def __init__(
        self, model: Any, info: ModelInfo, extras: dict[str, LinearExtra], *, weight_bytes: int = 0
    ) -> None:
        self.model = model
        self.info = info
        self.extras = extras
        self.tok = ByteTokenizer()
        self.dtype = DTYPES[info.dtype]
        core: Any = model.model  # the decoder stack of a *ForCausalLM
        self.layers: list[torch.nn.Module] = list(core.layers)
        self.norm: Any = core.norm
        self.lm_head: Any = model.lm_head
        self.decoder: Decoder | None = None
        self.device = next(model.parameters()).device
        #: Bytes of checkpoint this rank read (its shard plus the replicated tensors).
        self.weight_bytes = weight_bytes

    @classmethod
    def load(cls, name: str, model_dir: Path, *, dtype: str, tp_size: int) -> ModelRunner:
        """Load ``model_dir`` and wrap it with DeepSpeed inference (AutoTP over ``tp_size``)."""
        import deepspeed
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir)
        # Built on the meta device: AutoTP gives each layer its local shape, then only this
        # rank's rows or columns are read from the checkpoint (model_store.load_shard).
        with torch.device("meta"):
            model: Any = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        model.eval()
        engine = deepspeed.init_inference(
            model,
            tensor_parallel={"tp_size": tp_size},
            dtype=DTYPES[dtype],
            replace_with_kernel_inject=False,
        )
        module: Any = engine.module
        rank = int(os.environ.get("RANK", "0"))
        weight_bytes = model_store.load_shard(module, model_dir, rank=rank, tp_size=tp_size)
        # Buffers are not in the checkpoint: rebuild the rotary tables for real.
        rotary = module.model.rotary_emb
        module.model.rotary_emb = type(rotary)(config=config, device=model_store.rank_device())
        for mname, buf in module.named_buffers():
            if buf.is_meta:
                raise RuntimeError(f"buffer {mname} was left on the meta device")
        meta = model_store.card(model_dir)
        extras: dict[str, LinearExtra] = {}
        extras_path = model_dir / "extras.safetensors"
        if extras_path.is_file():
            tensors = load_file(str(extras_path))
            for kind in ("adapters", "heads"):
                for ename in meta[kind]:
                    w = tensors[f"{kind}.{ename}.weight"].to(torch.float32)
                    b = tensors.get(f"{kind}.{ename}.bias")
                    extras[f"{kind}.{ename}"] = LinearExtra(w, None if b is None else b.float())
        info = ModelInfo(
            name=name,
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
            vocab_size=int(config.vocab_size),
            max_positions=int(config.max_position_embeddings),
            tokenizer=str(meta["tokenizer"]),
            checkpoint_sha256=model_store.checkpoint_sha256(model_dir),
            dtype=dtype,
            adapters=dict(meta["adapters"]),
            heads=dict(meta["heads"]),
        )
        return cls(module, info, extras, weight_bytes=weight_bytes)

    # -- query: the serving decoder (batched by the scheduler on rank 0) --------------------
    def attach_decoder(self, *, slots: int, max_len: int | None = None) -> Decoder:
        """Allocate the static KV cache and the decoder that serves generation."""
        from tpm_faas.runtime.decoder import Decoder

        self.decoder = Decoder(
            self.model, slots=slots, max_len=min(max_len or 1 << 30, self.info.max_positions)
        )
        return self.decoder

    def run_plan(self, plan: dict[str, Any]) -> torch.Tensor:
        """Run one scheduler plan (``prefill`` or ``decode``) on this rank."""
        if self.decoder is None:
            raise RuntimeError("no decoder attached")
        return self.decoder.run_plan(plan)

    # -- embed -----------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("inputs_embeds") is not None:
            x = decode_tensor(body["inputs_embeds"]).float()
        else:
            adapter = self.extras.get(f"adapters.{body['adapter']}")
            if adapter is None:
                raise RequestError(f"unknown adapter {body['adapter']!r}")
            x = adapter(decode_tensor(body["adapter_input"]).float())
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[-1] != self.info.hidden_size:
            raise TensorError(
                f"inputs have shape {list(x.shape)}; need [batch, tokens, {self.info.hidden_size}]"
            )
        hidden = self.model.model(inputs_embeds=x.to(self.device, self.dtype)).last_hidden_state
        hidden = hidden.float()
        pooled = hidden.mean(dim=1) if body["pooling"] == "mean" else hidden[:, -1]
        result: dict[str, Any] = {
            "input_tokens": int(x.shape[0] * x.shape[1]),
            "pooling": body["pooling"],
        }
        if body.get("head"):
            head = self.extras.get(f"heads.{body['head']}")
            if head is None:
                raise RequestError(f"unknown head {body['head']!r}")
            result["head"] = body["head"]
            result["output"] = encode_tensor(head(pooled))
        else:
            result["output"] = encode_tensor(pooled)
        return result

    # -- intervene -------------------------------------------------------------------------
    @torch.inference_mode()
    def intervene(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = self.tok.encode(body["prompt"])
        n = len(ids)
        saves: dict[int, list[int]] = {}
        lens: dict[int, list[int]] = {}
        adds: dict[int, list[tuple[torch.Tensor, list[int] | None]]] = {}
        lens_k = 1
        for op in body["ops"]:
            if op["op"] == "save":
                for layer in op["layers"]:
                    saves[layer] = sorted(set(saves.get(layer, [])) | set(op["positions"]))
            elif op["op"] == "logit_lens":
                lens_k = max(lens_k, int(op["top_k"]))
                for layer in op["layers"]:
                    lens[layer] = sorted(set(lens.get(layer, [])) | set(op["positions"]))
            elif op["op"] == "add":
                vec = decode_tensor(op["vector"]).to(self.device).float() * float(op["scale"])
                adds.setdefault(int(op["layer"]), []).append((vec, op["positions"]))
            else:
                raise RequestError(f"unknown intervention op {op['op']!r}")
        for layer in (*saves, *lens, *adds):
            if not 0 <= layer < len(self.layers):
                raise RequestError(f"layer {layer} is out of range")
        captured: dict[int, torch.Tensor] = {}
        offset = [0]  # position of the first token of the current forward pass

        def hook(layer: int) -> Callable[[torch.nn.Module, Any, Any], Any]:
            def run(_m: torch.nn.Module, _inp: Any, output: Any) -> Any:
                h = output[0] if isinstance(output, tuple) else output
                t = h.shape[1]
                for vec, pos in adds.get(layer, ()):
                    if pos is None:
                        h = h + vec.to(h.dtype)
                    else:
                        rows = [p - offset[0] for p in pos if 0 <= p - offset[0] < t]
                        if rows:
                            h = h.clone()
                            h[:, rows] += vec.to(h.dtype)
                if offset[0] == 0 and layer in captured_layers:
                    captured[layer] = h[0].detach().float().clone()
                return (h, *output[1:]) if isinstance(output, tuple) else h

            return run

        captured_layers = set(saves) | set(lens)
        hooked = set(captured_layers) | set(adds)
        with _hooks({i: hook(i) for i in sorted(hooked)}, self.layers):
            new: list[int] = []
            max_new = int(body["max_new_tokens"])
            if max_new > 0:
                new = self._decode_with_offset(ids, max_new, int(body["seed"]), offset)
            else:
                self.model(input_ids=torch.tensor([ids], device=self.device))
        saved = {
            f"blocks.{layer}.hook_resid_post": {
                "positions": pos,
                "tensor": encode_tensor(captured[layer][pos]),
            }
            for layer, pos in sorted(saves.items())
        }
        table = []
        for layer, pos in sorted(lens.items()):
            h = captured[layer][pos].to(self.dtype).unsqueeze(0)  # AutoTP's lm_head wants 3-D
            probs = torch.softmax(self.lm_head(self.norm(h))[0].float(), -1)
            top = torch.topk(probs, lens_k, dim=-1)
            for j, p in enumerate(pos):
                table.append(
                    {
                        "layer": layer,
                        "position": p,
                        "input_token": self.tok.token_str(ids[p]),
                        "top": [
                            {
                                "token": self.tok.token_str(int(t)),
                                "id": int(t),
                                "prob": round(float(q), 6),
                            }
                            for t, q in zip(top.indices[j], top.values[j], strict=True)
                        ],
                    }
                )
        return {
            "prompt_tokens": n,
            "completion_tokens": len(new),
            "text": self.tok.decode(new),
            "saved": saved,
            "logit_lens": table,
        }

    def _decode_with_offset(
        self, ids: list[int], max_new: int, seed: int, offset: list[int]
    ) -> list[int]:
        from transformers import DynamicCache

        cache = DynamicCache()
        gen = torch.Generator().manual_seed(seed)
        inputs = torch.tensor([ids], device=self.device)
        new: list[int] = []
        offset[0] = 0
        for _ in range(max_new):
            logits = self.model(input_ids=inputs, past_key_values=cache, use_cache=True).logits
            nxt = sample(torch.log_softmax(logits[0, -1].float(), -1), 0.0, 1.0, gen)
            new.append(nxt)
            if nxt == self.tok.eos_id:
                break
            offset[0] += inputs.shape[1]
            inputs = torch.tensor([[nxt]], device=self.device)
        return new


@contextmanager
def _hooks(
    hooks: dict[int, Callable[[torch.nn.Module, Any, Any], Any]], layers: list[torch.nn.Module]
) -> Iterator[None]:
    handles = [layers[i].register_forward_hook(fn) for i, fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
