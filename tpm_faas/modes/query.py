"""Query mode: prompt(s) in, generated text (and optionally token log-probs) out."""

from __future__ import annotations

from typing import Any

from tpm_faas.modes.base import Admission, Mode, check_context, count_tokens
from tpm_faas.policy import Limits, Usage, check_limit
from tpm_faas.protocol.requests import QueryRequest
from tpm_faas.registry import ModelInfo

#: Worst-case bytes of one generated token in a result (text, id, log-prob and JSON).
BYTES_PER_TOKEN = 64


class QueryMode(Mode):
    name = "query"
    request_model = QueryRequest
    shard_op = "generate"

    def admit(self, request: QueryRequest, model: ModelInfo, limits: Limits) -> Admission:
        check_limit("the number of prompts", len(request.prompts), limits.max_prompts)
        check_limit("max_new_tokens", request.max_new_tokens, limits.max_new_tokens)
        tokens = [count_tokens(model, p) for p in request.prompts]
        for i, n in enumerate(tokens):
            check_limit(f"prompts[{i}] (tokens)", n, limits.max_prompt_tokens)
            check_context(model, n, request.max_new_tokens, limits)
        worst_out = request.max_new_tokens * len(request.prompts)
        worst = Usage(
            input_tokens=sum(tokens),
            output_tokens=worst_out,
            bytes_returned=BYTES_PER_TOKEN * worst_out,
        )
        return Admission(worst, self.shard_op, request.model_dump(exclude={"request_id"}))

    def usage(self, request: QueryRequest, admission: Admission, result: dict[str, Any]) -> Usage:
        outs = result["completions"]
        return Usage(
            input_tokens=sum(int(c["prompt_tokens"]) for c in outs),
            output_tokens=sum(int(c["completion_tokens"]) for c in outs),
        )
