"""The mode contract: what every mode declares, and the checks the modes share.

A mode is one class (one module under :mod:`tpm_faas.modes`) with declarative attributes
and three methods; the registry in :mod:`tpm_faas.modes` lists one instance of each, and is
the only list of modes: the CLI's choices, the Globus Auth scopes, function registration,
the policy's mode names, the rank's dispatch and the client all derive from it.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel

from tpm_faas.errors import LimitExceeded, RequestError
from tpm_faas.policy import Limits, Usage, check_limit
from tpm_faas.protocol.replies import Record
from tpm_faas.protocol.requests import ChatMessage
from tpm_faas.registry import ModelInfo
from tpm_faas.tokenizer import Tokenizer, load_tokenizer


@dataclass(frozen=True)
class Admission:
    """The worst case of a request, fixed before it runs: what the ledger holds, and the
    shard message (its JSON body, built through the mode's ``shard_body`` model) that the
    shard group runs exactly as priced."""

    worst: Usage
    shard_op: str
    body: dict[str, Any]


class Mode(ABC):
    """One inference mode.

    :cvar name: the mode's name: its Globus Auth scope suffix, the registered function's name
        and the shard op it runs
    :cvar function: the function registered with Globus Compute (defined at the top level of
        the mode's module, so that it can travel as source text)
    :cvar summary: one line for the CLI and the docs
    :cvar scope_title: the consent title of the mode's Globus Auth scope
    :cvar scope_description: the consent text of the mode's Globus Auth scope
    :cvar request_model: what a user sends (:mod:`tpm_faas.protocol.requests`)
    :cvar output_model: the ``output`` of its reply (:mod:`tpm_faas.protocol.replies`)
    :cvar shard_body: the body of its shard message (:mod:`tpm_faas.protocol.shard`)
    :cvar scheduled: whether rank 0 runs it through the iteration-level scheduler (token
        generation) or whole, on every rank, between two scheduler steps
    """

    name: ClassVar[str]
    function: ClassVar[Callable[..., str]]
    summary: ClassVar[str]
    scope_title: ClassVar[str]
    scope_description: ClassVar[str]
    request_model: ClassVar[type[BaseModel]]
    output_model: ClassVar[type[Record]]
    shard_body: ClassVar[type[BaseModel]]
    scheduled: ClassVar[bool]

    @property
    def shard_op(self) -> str:
        return self.name

    @abstractmethod
    def admit(self, request: Any, model: ModelInfo, limits: Limits) -> Admission:
        """Check ``request`` against the model and the caller's limits; price its worst case
        (a true upper bound of what it returns and is charged); build its shard message."""

    @abstractmethod
    def usage(self, request: Any, admission: Admission, output: Any) -> Usage:
        """What the request consumed, from the shard group's output (``output_model``);
        ``bytes_returned`` is counted by the gateway."""

    def receipt_extras(self, request: Any, admission: Admission) -> dict[str, Any]:
        """Fields this mode adds to the receipt (none by default)."""
        return {}

    def admitted(self, worst: Usage, body: BaseModel) -> Admission:
        """The admission of a request whose shard message is ``body``."""
        if not isinstance(body, self.shard_body):
            raise TypeError(f"{self.name}: the shard body must be {self.shard_body.__name__}")
        return Admission(worst, self.shard_op, body.model_dump(mode="json"))


def tokenizer_for(model: ModelInfo) -> Tokenizer:
    """The tokenizer ``model`` declares (its checkpoint's own, or the byte tokenizer)."""
    return load_tokenizer(model.tokenizer, model.tokenizer_dir, vocab_size=model.vocab_size)


def prompt_ids(
    model: ModelInfo,
    prompts: Sequence[str] | None,
    chats: Sequence[Sequence[ChatMessage]] | None,
    *,
    add_generation_prompt: bool = True,
) -> list[list[int]]:
    """The token ids the shard group will run for each prompt, or each chat rendered with the
    model's chat template (the gateway prices these exact ids)."""
    tok = tokenizer_for(model)
    if chats is not None:
        if not model.chat:
            raise RequestError(
                f"model {model.name} has no chat template; send 'prompts' instead of chats"
            )
        ids = [
            tok.encode_chat(
                [m.model_dump() for m in chat], add_generation_prompt=add_generation_prompt
            )
            for chat in chats
        ]
    else:
        ids = [tok.encode(p) for p in prompts or []]
    for i, one in enumerate(ids):
        if not one:
            raise RequestError(f"input {i} has no tokens")
    return ids


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


def sha256_json(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no spaces)."""
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()
