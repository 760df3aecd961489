"""What every mode declares, and the checks they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel

from tpm_faas.errors import LimitExceeded, RequestError
from tpm_faas.policy import Limits, Usage, check_limit
from tpm_faas.registry import ModelInfo
from tpm_faas.tokenizer import ByteTokenizer


@dataclass(frozen=True)
class Admission:
    """The worst case of a request, fixed before it runs: what the ledger holds."""

    worst: Usage
    shard_op: str
    body: dict[str, Any]


class Mode(ABC):
    """One inference mode: its name (also its scope suffix), request model and shard op."""

    name: ClassVar[str]
    request_model: ClassVar[type[BaseModel]]
    shard_op: ClassVar[str]

    @abstractmethod
    def admit(self, request: Any, model: ModelInfo, limits: Limits) -> Admission:
        """Check ``request`` against the model and the caller's limits; price its worst case."""

    @abstractmethod
    def usage(self, request: Any, admission: Admission, result: dict[str, Any]) -> Usage:
        """What the request actually consumed, from the shard group's result."""


def tokenizer_for(model: ModelInfo) -> ByteTokenizer:
    if model.tokenizer != "bytes":
        raise RequestError(f"model {model.name} uses tokenizer {model.tokenizer!r}, unknown here")
    return ByteTokenizer()


def count_tokens(model: ModelInfo, text: str) -> int:
    return len(tokenizer_for(model).encode(text))


def check_context(
    model: ModelInfo, prompt_tokens: int, new_tokens: int, limits: Limits | None = None
) -> None:
    if limits is not None and limits.max_context_tokens is not None:
        check_limit(
            "prompt plus max_new_tokens (tokens)",
            prompt_tokens + new_tokens,
            limits.max_context_tokens,
        )
    if prompt_tokens + new_tokens > model.max_positions:
        raise LimitExceeded(
            f"prompt ({prompt_tokens} tokens) plus max_new_tokens ({new_tokens}) exceeds the "
            f"model's context of {model.max_positions} tokens"
        )


def check_output_bytes(estimate: int, limits: Limits) -> None:
    check_limit(
        "the result size this request may return (bytes)", estimate, limits.max_bytes_returned
    )
