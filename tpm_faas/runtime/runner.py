"""The model of one rank: loading its shard, the serving decoder, and embed.

Every rank of a shard group runs the same calls with the same inputs in the same order
(tensor-parallel layers all-reduce inside the forward pass, and so do a mixture of experts'
blocks under expert parallelism, :mod:`tpm_faas.runtime.moe`), so every rank computes the
same result; rank 0 returns it. Inputs here were validated and normalised by the gateway; this
module still checks what it indexes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from tpm_faas import catalog
from tpm_faas._extras import require
from tpm_faas.errors import RequestError, TensorError
from tpm_faas.protocol.shard import EmbedBody, parse_body
from tpm_faas.registry import ModelInfo
from tpm_faas.runtime import model_store
from tpm_faas.runtime.interventions import DTYPES, Heads, decode_tensor, encode_tensor
from tpm_faas.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from tpm_faas.runtime.decoder import Decoder


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
    """A loaded model (possibly a tensor- or expert-parallel shard) and its registered extras.

    :param tp_size: tensor-parallel ranks (1: attention and dense layers whole on this rank)
    :param ep_size: expert-parallel ranks (1: every routed expert on this rank)
    """

    def __init__(
        self,
        model: Any,
        info: ModelInfo,
        extras: dict[str, LinearExtra],
        *,
        weight_bytes: int = 0,
        tp_size: int = 1,
        ep_size: int = 1,
    ) -> None:
        self.model = model
        self.info = info
        self.extras = extras
        self.tok = load_tokenizer(info.tokenizer, info.tokenizer_dir, vocab_size=info.vocab_size)
        self.dtype = DTYPES[info.dtype]
        self.decoder: Decoder | None = None
        self.device = next(model.parameters()).device
        #: Bytes of checkpoint this rank read (its shard plus the replicated tensors).
        self.weight_bytes = weight_bytes
        self.tp_size, self.ep_size = tp_size, ep_size

    @classmethod
    def load(
        cls, name: str, model_dir: Path, *, dtype: str, tp_size: int, ep_size: int = 1
    ) -> ModelRunner:
        """Load ``model_dir`` as this rank's share of a group of ``max(tp_size, ep_size)``
        ranks: DeepSpeed AutoTP over the ranks when ``tp_size > 1`` (whole layers at 1), and a
        mixture of experts' blocks run by :mod:`tpm_faas.runtime.moe`, each rank holding
        ``1 / ep_size`` of the routed experts
        (:func:`tpm_faas.runtime.model_store.check_parallel`)."""
        require("deepspeed", "runtime")
        require("transformers", "runtime")
        import deepspeed
        from transformers import AutoModelForCausalLM

        from tpm_faas.runtime.model_store import check_parallel, routed_experts

        size = check_parallel(name, model_dir, tp_size, ep_size)
        world = _world_size()
        if size != world:
            raise RuntimeError(f"a group of {size} ranks loaded in a world of {world}")
        config = model_store.hf_config(model_dir)
        # Built on the meta device: AutoTP gives each layer its local shape, then only this
        # rank's rows or columns are read from the checkpoint (model_store.load_shard).
        with torch.device("meta"):
            model: Any = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        model.eval()
        # tp_size 1 in a world of several ranks (expert parallelism alone) shards nothing.
        engine = deepspeed.init_inference(
            model,
            tensor_parallel={"tp_size": tp_size},
            dtype=DTYPES[dtype],
            replace_with_kernel_inject=False,
        )
        module: Any = engine.module
        rank = _this_rank()
        raw_config = json.loads((model_dir / "config.json").read_text())
        if routed_experts(raw_config):
            from tpm_faas.runtime import moe

            # The MoE blocks under their own parameter names; under EP each rank's fused
            # expert parameters shrink to its share, which load_shard then reads alone.
            moe.install(module, rank=rank, ep_size=ep_size)
        # Every rank's local shapes are gathered: tp_size there is the group's size.
        weight_bytes = model_store.load_shard(module, model_dir, rank=rank, tp_size=size)
        # Buffers are not in the checkpoint: rebuild the rotary tables for real.
        core = module.base_model
        if hasattr(core, "rotary_emb"):
            rotary = core.rotary_emb
            with torch.device(model_store.rank_device()):
                core.rotary_emb = type(rotary)(config=config)
        for mname, buf in module.named_buffers():
            if buf.is_meta:
                raise RuntimeError(f"buffer {mname} was left on the meta device")
        meta = catalog.card(model_dir)
        extras: dict[str, LinearExtra] = {}
        extras_path = model_dir / "extras.safetensors"
        if extras_path.is_file():
            tensors = load_file(str(extras_path))
            for kind in ("adapters", "heads"):
                for ename in meta[kind]:
                    w = tensors[f"{kind}.{ename}.weight"].to(torch.float32)
                    b = tensors.get(f"{kind}.{ename}.bias")
                    extras[f"{kind}.{ename}"] = LinearExtra(w, None if b is None else b.float())
        info = catalog.model_info(name, model_dir, dtype=dtype)
        return cls(
            module, info, extras, weight_bytes=weight_bytes, tp_size=tp_size, ep_size=ep_size
        )

    # -- query: the serving decoder (batched by the scheduler on rank 0) --------------------
    def attach_decoder(self, *, slots: int, max_len: int | None = None) -> Decoder:
        """Allocate the static KV cache and the decoder that serves generation and
        interventions."""
        from tpm_faas.runtime.decoder import Decoder

        self.decoder = Decoder(
            self.model,
            slots=slots,
            max_len=min(max_len or 1 << 30, self.info.max_positions),
            heads=self._heads(),
            gather_heads=_gather_heads if self.tp_size > 1 else None,
            rank=_this_rank(),
        )
        return self.decoder

    def _heads(self) -> Heads:
        """This rank's share of the attention heads (AutoTP gives each rank a contiguous run;
        every head on every rank at tp=1, whatever the group's size)."""
        import torch.distributed as dist

        if self.tp_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return Heads(0, self.info.num_heads, self.info.num_heads)
        attn: Any = self.model.base_model.layers[0].self_attn  # Llama (see check_tp)
        mine = int(attn.q_proj.weight.shape[0]) // self.info.head_dim
        counts = [
            torch.zeros(1, dtype=torch.int64, device=model_store.rank_device())
            for _ in range(dist.get_world_size())
        ]
        dist.all_gather(counts, torch.tensor([mine], device=model_store.rank_device()))
        every = [int(c) for c in counts]
        return Heads(sum(every[: dist.get_rank()]), mine, sum(every))

    def run_plan(self, plan: dict[str, Any]) -> Any:
        """Run one scheduler plan (``prefill``, ``decode``, ``release``) on this rank."""
        if self.decoder is None:
            raise RuntimeError("no decoder attached")
        return self.decoder.run_plan(plan)

    # -- embed -----------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, message: dict[str, Any]) -> dict[str, Any]:
        body = parse_body(EmbedBody, message)
        if body.input_ids is not None:
            return self._embed_ids(body)
        if body.inputs_embeds is not None:
            x = decode_tensor(body.inputs_embeds.model_dump()).float()
        else:
            assert body.adapter_input is not None  # EmbedBody: one input or the other
            adapter = self.extras.get(f"adapters.{body.adapter}")
            if adapter is None:
                raise RequestError(f"unknown adapter {body.adapter!r}")
            x = adapter(decode_tensor(body.adapter_input.model_dump()).float())
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[-1] != self.info.hidden_size:
            raise TensorError(
                f"inputs have shape {list(x.shape)}; need [batch, tokens, {self.info.hidden_size}]"
            )
        core = self.model.base_model  # the decoder stack of the *ForCausalLM
        hidden = core(inputs_embeds=x.to(self.device, self.dtype)).last_hidden_state
        pooled = _pool(hidden.float(), body.pooling)
        return self._embed_result(pooled, int(x.shape[0] * x.shape[1]), body)

    def _embed_ids(self, body: EmbedBody) -> dict[str, Any]:
        """Token ids through the model's own embeddings and the core, one sequence at a time
        (lengths differ; no padding enters the pooled states)."""
        assert body.input_ids is not None
        rows = []
        core = self.model.base_model
        for ids in body.input_ids:
            if max(ids) >= self.info.vocab_size:
                raise RequestError(f"token id {max(ids)} is outside the vocabulary")
            t = torch.tensor([ids], device=self.device)
            rows.append(_pool(core(input_ids=t).last_hidden_state.float(), body.pooling))
        tokens = sum(len(ids) for ids in body.input_ids)
        return self._embed_result(torch.cat(rows), tokens, body)

    def _embed_result(self, pooled: torch.Tensor, tokens: int, body: EmbedBody) -> dict[str, Any]:
        result: dict[str, Any] = {"input_tokens": tokens, "pooling": body.pooling}
        if body.head:
            head = self.extras.get(f"heads.{body.head}")
            if head is None:
                raise RequestError(f"unknown head {body.head!r}")
            result["head"] = body.head
            result["output"] = encode_tensor(head(pooled))
        else:
            result["output"] = encode_tensor(pooled)
        return result


def _pool(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[b, t, d]`` → ``[b, d]``: the mean over tokens, or the last token."""
    return hidden.mean(dim=1) if pooling == "mean" else hidden[:, -1]


def _gather_heads(t: torch.Tensor) -> torch.Tensor:
    """Join a per-head tensor ``[..., heads, head_dim]`` across the group's ranks (in rank
    order, which is head order under AutoTP). Ranks may hold different numbers of heads:
    each part is padded to the largest for the all-gather, then cut back."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    dev = model_store.rank_device()
    world = dist.get_world_size()
    mine = torch.tensor([t.shape[-2]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(counts, mine)
    sizes = [int(c) for c in counts]
    pad = [*t.shape[:-2], max(sizes), t.shape[-1]]
    local = torch.zeros(pad, dtype=t.dtype, device=dev)
    local[..., : t.shape[-2], :] = t.to(dev)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.cat([p[..., :n, :] for p, n in zip(parts, sizes, strict=True)], dim=-2).cpu()


def _world_size() -> int:
    """The ranks of this process's group (1 when torch.distributed is not started)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _this_rank() -> int:
    """This process's rank in the shard group (0 when torch.distributed is not started)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
