"""Helpers the tensor- and expert-parallel tests share: a request served whole in this
process through the scheduler and decoder rank 0 runs (the reference a group is held to), and
limits that let every op through."""

from __future__ import annotations

from typing import Any

from tpm_faas.policy import Limits
from tpm_faas.protocol.requests import WRITE_OPS
from tpm_faas.runtime.decoder import Decoder
from tpm_faas.runtime.scheduler import Scheduler
from tpm_faas.tokenizer import Tokenizer

#: Every op, writes included, and room for large saves.
WRITES = Limits(
    allowed_ops=[*WRITE_OPS, "save", "logit_lens"],
    write=True,
    max_hook_sites=1000,
    max_bytes_returned=1 << 30,
    max_prompt_tokens=400,
)


def served_alone(dec: Decoder, op: str, body: dict[str, Any], tok: Tokenizer) -> dict[str, Any]:
    """``body`` (a ``query`` or ``intervene`` shard body) through the scheduler and ``dec``
    in this process; the result of its one reply."""
    sched = Scheduler(dec.run_plan, slots=dec.slots, max_len=dec.max_len, tokenizer=tok)
    sched.submit(0, "r0", body, intervene=op == "intervene")
    replies = []
    while sched.busy:
        replies += sched.step()
    [(_, reply)] = replies
    assert reply["ok"], reply
    result: dict[str, Any] = reply["result"]
    return result
