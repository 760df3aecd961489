"""Query mode: prompt(s) in, generated text (and optionally token log-probs) out."""

from __future__ import annotations

from typing import Any

from tpm_faas.modes import pricing
from tpm_faas.modes.base import (
    Admission,
    Mode,
    check_context,
    check_output_bytes,
    prompt_ids,
    tokenizer_for,
)
from tpm_faas.policy import Limits, Usage, check_limit
from tpm_faas.protocol.replies import QueryOutput
from tpm_faas.protocol.requests import QueryRequest
from tpm_faas.protocol.shard import QueryBody
from tpm_faas.registry import ModelInfo


def worst_bytes(
    prompt_tokens: list[int], max_new_tokens: int, model: ModelInfo, *, logprobs: bool
) -> int:
    """The most a query result's ``output`` may count as ``bytes_returned``::

        {"completions":[<completion>,…]}

    each completion at most ``max_new_tokens`` tokens (see :func:`pricing.completion`)."""
    tok = tokenizer_for(model)
    runs = [
        pricing.completion(n, max_new_tokens, model.vocab_size, tok, logprobs=logprobs)
        for n in prompt_tokens
    ]
    return 15 + pricing.list_json(runs) + 1


def query(request_json: str, token: str | None = None) -> str:
    """Generate text for prompt(s).

    See :class:`tpm_faas.protocol.requests.QueryRequest`.

    The function registered with Globus Compute for this mode (as source text: its body
    imports what it needs). JSON in, JSON out; never raises.
    """
    from tpm_faas.gateway.pipeline import handle

    return handle("query", request_json, token)


class QueryMode(Mode):
    name = "query"
    function = staticmethod(query)
    scope_title = "Query the hosted model"
    scope_description = "Send prompts to the model and receive text."
    summary = "prompts or chats in, generated text (and optionally token log-probs) out"
    request_model = QueryRequest
    output_model = QueryOutput
    shard_body = QueryBody
    scheduled = True

    def admit(self, request: QueryRequest, model: ModelInfo, limits: Limits) -> Admission:
        check_limit("the number of prompts", request.n_inputs, limits.max_prompts)
        check_limit("max_new_tokens", request.max_new_tokens, limits.max_new_tokens)
        ids = prompt_ids(
            model,
            request.prompts,
            request.chats,
            add_generation_prompt=request.add_generation_prompt,
        )
        tokens = [len(i) for i in ids]
        for i, n in enumerate(tokens):
            check_limit(f"prompts[{i}] (tokens)", n, limits.max_prompt_tokens)
            check_context(model, n, request.max_new_tokens, limits)
        worst_out = request.max_new_tokens * len(ids)
        out_bytes = worst_bytes(tokens, request.max_new_tokens, model, logprobs=request.logprobs)
        check_output_bytes(out_bytes, limits)
        worst = Usage(input_tokens=sum(tokens), output_tokens=worst_out, bytes_returned=out_bytes)
        body = QueryBody.model_validate(
            {
                "prompt_ids": ids,
                **request.model_dump(
                    exclude={
                        "model",
                        "request_id",
                        "prompts",
                        "chats",
                        "add_generation_prompt",
                    }
                ),
            }
        )
        return self.admitted(worst, body)

    def receipt_extras(self, request: QueryRequest, admission: Admission) -> dict[str, Any]:
        return {"batch_invariant": request.reproducible}

    def usage(self, request: QueryRequest, admission: Admission, output: QueryOutput) -> Usage:
        return Usage(
            input_tokens=sum(c.prompt_tokens for c in output.completions),
            output_tokens=sum(c.completion_tokens for c in output.completions),
        )
