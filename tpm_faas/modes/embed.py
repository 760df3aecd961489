"""Customized embeddings: user inputs (text, ``inputs_embeds`` or an input adapter's raw
input) through the frozen core, out through a registered head or as pooled hidden states."""

from __future__ import annotations

import json
from typing import Any

from tpm_faas.errors import RequestError, TensorError
from tpm_faas.modes import pricing
from tpm_faas.modes.base import (
    Admission,
    Mode,
    check_context,
    check_output_bytes,
    prompt_ids,
)
from tpm_faas.policy import Limits, Usage, check_limit
from tpm_faas.protocol.replies import EmbedOutput
from tpm_faas.protocol.requests import EmbedRequest
from tpm_faas.protocol.shard import EmbedBody
from tpm_faas.registry import ModelInfo


def embed(request_json: str, token: str | None = None) -> str:
    """Run custom inputs through the frozen core.

    See :class:`tpm_faas.protocol.requests.EmbedRequest`.

    The function registered with Globus Compute for this mode (as source text: its body
    imports what it needs). JSON in, JSON out; never raises.
    """
    from tpm_faas.gateway.pipeline import handle

    return handle("embed", request_json, token)


def worst_bytes(request: EmbedRequest, batch: int, tokens: int, out_width: int) -> int:
    """The most an embed result's ``output`` may count as ``bytes_returned``
    (:meth:`tpm_faas.runtime.runner.ModelRunner.embed`)::

        {"input_tokens":N,"pooling":"mean","head":"…","output":<float32 [batch, out_width]>}

    and, should the tensor go by reference, its key, its entry in the results file's header
    and the file's envelope (see :mod:`.pricing`)."""
    shape = [batch, out_width]
    n = 16 + pricing.digits(batch * tokens)  # {"input_tokens":N
    n += 11 + len(json.dumps(request.pooling))  # ,"pooling":"mean"
    if request.head is not None:
        n += 8 + len(json.dumps(request.head))  # ,"head":"…"
    n += 10 + pricing.tensor_payload(shape) + 1  # ,"output":{…}}
    data = batch * out_width * pricing.BYTES_PER_VALUE
    extra = pricing.by_reference_extra("output", shape, data)
    return n + extra + pricing.by_reference_envelope(request.request_id, data + extra)


class EmbedMode(Mode):
    name = "embed"
    function = staticmethod(embed)
    scope_title = "Customized embeddings"
    scope_description = "Run your input adapters and output heads around the frozen model."
    summary = "text, inputs_embeds or an adapter's raw input through the frozen core; a head out"
    request_model = EmbedRequest
    output_model = EmbedOutput
    shard_body = EmbedBody
    scheduled = False

    def admit(self, request: EmbedRequest, model: ModelInfo, limits: Limits) -> Admission:
        if request.prompts is not None or request.chats is not None:
            return self._admit_text(request, model, limits)
        if request.inputs_embeds is not None:
            t = request.inputs_embeds
            where = "inputs_embeds"
            width = model.hidden_size
        else:
            assert request.adapter is not None and request.adapter_input is not None
            spec = model.adapters.get(request.adapter)
            if spec is None:
                known = ", ".join(sorted(model.adapters)) or "none"
                raise RequestError(f"unknown adapter {request.adapter!r} (registered: {known})")
            t = request.adapter_input
            where = "adapter_input"
            width = int(spec["in_features"])
        shape = list(t.shape)
        if len(shape) == 2:
            shape = [1, *shape]
        if len(shape) != 3:
            raise TensorError(
                f"{where} must have shape [batch, tokens, {width}] or [tokens, {width}]"
            )
        batch, tokens, feat = shape
        if feat != width:
            raise TensorError(
                f"{where} has last dimension {feat}; model {model.name} needs {width}"
            )
        check_limit(f"{where} size (bytes)", t.nbytes, limits.max_input_bytes)
        check_limit("the batch of inputs", batch, limits.max_prompts)
        check_limit("tokens per input", tokens, limits.max_prompt_tokens)
        check_context(model, tokens, 0)
        out_width = self._out_width(request, model)
        out_bytes = worst_bytes(request, batch, tokens, out_width)
        check_output_bytes(out_bytes, limits)
        worst = Usage(input_tokens=batch * tokens, bytes_returned=out_bytes)
        body = EmbedBody(
            inputs_embeds=request.inputs_embeds,
            adapter=request.adapter,
            adapter_input=request.adapter_input,
            head=request.head,
            pooling=request.pooling,
        )
        return self.admitted(worst, body)

    def _admit_text(self, request: EmbedRequest, model: ModelInfo, limits: Limits) -> Admission:
        """Text through the model's own tokenizer (and chat template) and embeddings."""
        n = len(request.prompts or request.chats or [])
        check_limit("the batch of inputs", n, limits.max_prompts)
        ids = prompt_ids(
            model,
            request.prompts,
            request.chats,
            add_generation_prompt=request.add_generation_prompt,
        )
        longest = max(len(i) for i in ids)
        for i, one in enumerate(ids):
            check_limit(f"inputs[{i}] (tokens)", len(one), limits.max_prompt_tokens)
        check_context(model, longest, 0)
        out_width = self._out_width(request, model)
        out_bytes = worst_bytes(request, len(ids), longest, out_width)
        check_output_bytes(out_bytes, limits)
        worst = Usage(input_tokens=sum(len(i) for i in ids), bytes_returned=out_bytes)
        body = EmbedBody(input_ids=ids, head=request.head, pooling=request.pooling)
        return self.admitted(worst, body)

    def receipt_extras(self, request: EmbedRequest, admission: Admission) -> dict[str, Any]:
        # One forward of this request's inputs alone: nothing else shares its batch.
        return {"batch_invariant": True, "adapter": request.adapter, "head": request.head}

    @staticmethod
    def _out_width(request: EmbedRequest, model: ModelInfo) -> int:
        if request.head is None:
            return model.hidden_size
        head = model.heads.get(request.head)
        if head is None:
            known = ", ".join(sorted(model.heads)) or "none"
            raise RequestError(f"unknown head {request.head!r} (registered: {known})")
        return int(head["out_features"])

    def usage(self, request: EmbedRequest, admission: Admission, output: EmbedOutput) -> Usage:
        return Usage(input_tokens=output.input_tokens)
