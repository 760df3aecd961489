"""Iteration-level batching of generation requests on rank 0.

Requests are split into sequences (one per prompt) that wait for a free cache slot. Each
:meth:`Scheduler.step` admits waiting sequences into free slots (one prefill each, which also
gives the sequence its first token), then runs **one** decode step for every running sequence
together, whatever their lengths, and retires the ones that finished. New requests therefore
join at the next decode-step boundary and finished ones leave at once.

Every model call goes through ``run_plan`` (a JSON-able plan: ``prefill`` or ``decode``), so
rank 0 can broadcast it to the other tensor-parallel ranks before running it itself. Sampling
happens on rank 0 only (per sequence, with its own seeded generator); the other ranks receive
the chosen tokens in the next plan.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel

from tpm_faas.errors import LimitExceeded, RequestError, ShardGroupError, TPMError
from tpm_faas.protocol.shard import InterveneBody, QueryBody, parse_body
from tpm_faas.runtime.interventions import name_lens_tokens
from tpm_faas.tokenizer import ByteTokenizer, Detokenizer, Tokenizer, find_stop

Plan = dict[str, Any]


@dataclass
class _Request:
    key: Any
    request_id: str
    body: dict[str, Any]
    enqueued: float
    #: A number unique within this scheduler for requests with interventions, else None.
    serial: int | None = None
    seqs: list[_Sequence] = field(default_factory=list)
    error: TPMError | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or all(s.done for s in self.seqs)


@dataclass
class _Sequence:
    request: _Request
    index: int
    ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    gen: torch.Generator
    #: Ids that end the sequence (EOS unless the request turned it off, and its stop ids).
    stop_ids: frozenset[int]
    #: Stop strings, watched through :attr:`text` as it grows.
    stop: tuple[str, ...] = ()
    text: Detokenizer | None = None
    finish_reason: str = "length"
    slot: int = -1
    new: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    started: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    max_batch: int = 0
    done: bool = False

    @property
    def position(self) -> int:
        """Where the next token fed to the model goes."""
        return len(self.ids) + len(self.new) - 1


class Scheduler:
    """Batches generation requests over the slots of a :class:`~.decoder.Decoder`.

    :param run_plan: runs a plan on every rank and returns rank 0's logits
    :param slots: the decoder's slots (the largest decode batch)
    :param max_len: tokens per slot
    :param max_batch: at most this many sequences decode together (at most ``slots``)
    :param tokenizer: the model's tokenizer (decodes results; its EOS ids end sequences)
    """

    def __init__(
        self,
        run_plan: Callable[[Plan], Any],
        *,
        slots: int,
        max_len: int,
        max_batch: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.run_plan = run_plan
        self.max_len = max_len
        self.max_batch = min(max_batch or slots, slots)
        self.tok = tokenizer or ByteTokenizer()
        self.eos_ids = frozenset(self.tok.eos_ids)
        self._free = list(range(self.max_batch))
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._requests: list[_Request] = []
        self._serials = 0

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._requests)

    @property
    def oldest_wait_s(self) -> float:
        """How long the oldest waiting sequence has waited (0 when none waits)."""
        if not self._waiting:
            return 0.0
        return time.perf_counter() - self._waiting[0].request.enqueued

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(
        self,
        key: Any,
        request_id: str,
        body: BaseModel | dict[str, Any],
        *,
        intervene: bool = False,
    ) -> None:
        """Queue a generation request: a :class:`QueryBody`, or an :class:`InterveneBody` (with
        the interventions the gateway normalised). A plain dict is read as one of them
        (``intervene`` says which). A body that does not fit fails alone at the next step."""
        req = _Request(key, request_id, {}, time.perf_counter())
        self._requests.append(req)
        try:
            typed: QueryBody | InterveneBody
            if isinstance(body, QueryBody | InterveneBody):
                typed = body
            elif isinstance(body, BaseModel):
                raise RequestError(f"the scheduler does not run {type(body).__name__}")
            elif intervene:
                typed = parse_body(InterveneBody, body)
            else:
                typed = parse_body(QueryBody, body)
            req.body = typed.model_dump()
            if isinstance(typed, InterveneBody):
                self._serials += 1
                req.serial = self._serials
            req.seqs = list(self._sequences(req, typed))
        except TPMError as e:
            req.error = e
            return
        self._waiting.extend(req.seqs)

    def _sequences(self, req: _Request, b: QueryBody | InterveneBody) -> list[_Sequence]:
        seqs = []
        stop_ids = set(self.eos_ids if b.stop_at_eos else ())
        stop: tuple[str, ...] = ()
        if isinstance(b, QueryBody):
            stop_ids.update(b.stop_token_ids)
            stop = tuple(b.stop)
        for i, ids in enumerate(b.prompt_ids):
            if max(ids) >= self.tok.vocab_size:
                raise RequestError(f"prompts[{i}] holds id {max(ids)}, outside the vocabulary")
            if len(ids) + b.max_new_tokens > self.max_len:
                raise LimitExceeded(
                    f"prompts[{i}] ({len(ids)} tokens) plus max_new_tokens ({b.max_new_tokens}) "
                    f"exceeds the serving context of {self.max_len} tokens"
                )
            seqs.append(
                _Sequence(
                    request=req,
                    index=i,
                    ids=ids,
                    max_new=b.max_new_tokens,
                    temperature=b.temperature,
                    top_p=b.top_p,
                    gen=torch.Generator().manual_seed(b.seed + i),
                    stop_ids=frozenset(stop_ids),
                    stop=stop,
                    text=self.tok.detokenizer() if stop else None,
                )
            )
        return seqs

    def abort(self, reason: str) -> list[tuple[Any, dict[str, Any]]]:
        """Fail every waiting and running request (the group is stopping)."""
        for req in self._requests:
            self._fail(req, ShardGroupError(reason))
        return self._retire()

    # -- one iteration ---------------------------------------------------------------------
    def step(self) -> list[tuple[Any, dict[str, Any]]]:
        """Admit, prefill and decode once; returns ``(key, reply)`` of finished requests."""
        while self._waiting and self._free:
            seq = self._waiting.popleft()
            if seq.request.error is not None:
                continue
            seq.slot = self._free.pop(0)
            seq.started = time.perf_counter()
            plan: Plan = {"op": "prefill", "slot": seq.slot, "ids": seq.ids}
            req = seq.request
            if req.serial is not None:  # the spec travels once, with the first prompt
                plan["iv"] = {"request": req.serial, "index": seq.index}
                if seq.index == 0:
                    plan["iv"]["spec"] = req.body
            try:
                logits = self.run_plan(plan)
            except Exception as e:  # this request fails alone
                self._fail(req, e)
                continue
            self._running.append(seq)
            if seq.max_new == 0:  # interventions on the prompt only
                seq.done = True
                seq.first_token = seq.finished = time.perf_counter()
                continue
            self._accept(seq, torch.log_softmax(logits[0].float(), dim=-1).cpu())
        active = [s for s in self._running if not s.done and s.request.error is None]
        for batch in _decode_batches(active):
            plan = {
                "op": "decode",
                "slots": [s.slot for s in batch],
                "tokens": [s.new[-1] for s in batch],
                "positions": [s.position for s in batch],
            }
            try:
                logits = self.run_plan(plan)
            except Exception as e:
                for s in batch:
                    self._fail(s.request, e)
            else:
                # The whole batch at once, then on the host: sampling uses each sequence's
                # CPU generator, and reading the chosen token needs no device sync per row.
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                for row, s in enumerate(batch):
                    s.max_batch = max(s.max_batch, len(batch))
                    self._accept(s, logp[row])
        return self._retire()

    def _accept(self, seq: _Sequence, logp: torch.Tensor) -> None:
        """Sample ``seq``'s next token from its log-probabilities; retire it when done.

        A sampling failure (e.g. non-finite logits from a write the request made) fails that
        request alone."""
        try:
            nxt = sample(logp, seq.temperature, seq.top_p, seq.gen)
        except Exception as e:
            seq.done = True
            seq.finished = time.perf_counter()
            self._fail(
                seq.request,
                RequestError(f"sampling failed for prompts[{seq.index}]: {type(e).__name__}: {e}"),
            )
            return
        now = time.perf_counter()
        if not seq.new:
            seq.first_token = now
        seq.new.append(nxt)
        seq.logprobs.append(float(logp[nxt]))
        stopped = nxt in seq.stop_ids
        if seq.text is not None and not stopped:
            held = len(seq.text.text)
            if seq.text.push(nxt):
                # Only the new text (and a stop string's length before it) can hold a new stop.
                longest = max(len(x) for x in seq.stop)
                stopped = find_stop(seq.text.text, seq.stop, start=max(held - longest, 0)) >= 0
        if stopped:
            seq.finish_reason = "stop"
        if stopped or len(seq.new) >= seq.max_new or seq.position + 1 >= self.max_len:
            seq.done, seq.finished = True, now

    def _fail(self, req: _Request, e: Exception) -> None:
        if req.error is None:
            req.error = as_tpm_error(e)

    def _retire(self) -> list[tuple[Any, dict[str, Any]]]:
        # A finished sequence gives its slot back at once, even if the rest of its request is
        # still running: a request may have more prompts than there are slots. (What a slot
        # held for interventions is replaced at the next prefill into it.)
        for s in [s for s in self._running if s.done]:
            self._running.remove(s)
            self._free.append(s.slot)
            s.slot = -1
        out = []
        for req in [r for r in self._requests if r.done]:
            self._requests.remove(req)
            collected = self._release(req)
            for s in req.seqs:
                if s in self._running:
                    self._running.remove(s)
                if s.slot >= 0:
                    self._free.append(s.slot)
                    s.slot = -1
            if req.error is not None:
                self._waiting = deque(s for s in self._waiting if s.request is not req)
                out.append((req.key, {"ok": False, "error": req.error.to_record(req.request_id)}))
            else:
                out.append((req.key, {"ok": True, "result": self._result(req, collected)}))
        self._free.sort()
        return out

    def _release(self, req: _Request) -> list[dict[str, Any]] | None:
        """Collect a request's intervention results and clear its state on every rank."""
        if req.serial is None:
            return None
        try:
            out: list[dict[str, Any]] | None = self.run_plan(
                {"op": "release", "request": req.serial}
            )
        except Exception as e:
            self._fail(req, e)
            return None
        return out

    def _result(self, req: _Request, collected: list[dict[str, Any]] | None) -> dict[str, Any]:
        completions = []
        for s in req.seqs:
            text = self.tok.decode(s.new)
            cut = find_stop(text, s.stop)
            item: dict[str, Any] = {
                "text": text if cut < 0 else text[:cut],
                "token_ids": s.new,
                "prompt_tokens": len(s.ids),
                "completion_tokens": len(s.new),
                "seconds": round(s.finished - req.enqueued, 6),
                "finish_reason": s.finish_reason if s.new else "length",
            }
            if req.body.get("logprobs"):
                item["logprobs"] = [
                    {"token": self.tok.token_str(t), "id": t, "logprob": lp}
                    for t, lp in zip(s.new, s.logprobs, strict=True)
                ]
            completions.append(item)
        decode_tokens = sum(max(0, len(s.new) - 1) for s in req.seqs)
        decode_s = max(s.finished for s in req.seqs) - min(s.first_token for s in req.seqs)
        timing = {
            "queue_s": round(max(s.started for s in req.seqs) - req.enqueued, 6),
            "ttft_s": round(max(s.first_token for s in req.seqs) - req.enqueued, 6),
            "decode_tok_s": round(decode_tokens / decode_s, 2) if decode_s > 0 else None,
            "max_batch": max(s.max_batch for s in req.seqs),
        }
        if req.serial is None:
            return {"completions": completions, "timing": timing}
        by_index = {c["index"]: c for c in collected or []}
        for item, s in zip(completions, req.seqs, strict=True):
            got = by_index.get(s.index, {})
            item["saved"] = got.get("saved", {})
            item["logit_lens"] = lens = got.get("logit_lens", [])
            name_lens_tokens(lens, self.tok.token_str)
        return {"results": completions, "timing": timing}


def _decode_batches(active: list[_Sequence]) -> list[list[_Sequence]]:
    """The decode batches of one step: a sequence of a ``reproducible`` request decodes alone
    (a batch of one whatever else the group serves, and whenever its request's other prompts
    got a slot, so its logits are the same bits on replay); the rest decode together."""
    shared = [s for s in active if not s.request.body.get("reproducible")]
    alone = [[s] for s in active if s.request.body.get("reproducible")]
    return [b for b in (shared, *alone) if b]


#: Words of the messages gloo and NCCL fail with when a peer rank is gone.
_PEER_LOST = (
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "gloo",
    "nccl",
    "timed out",
    "peer",
)


def as_tpm_error(e: BaseException) -> TPMError:
    """What a failure inside the group means to the caller: a collective or transport failure
    (a rank died, a link broke) is :class:`ShardGroupError` (``shard_unavailable``: the group,
    not the request, failed; try again or elsewhere); anything else not already a
    :class:`TPMError` is an internal error of the group."""
    if isinstance(e, TPMError):
        return e
    import torch.distributed as dist

    text = str(e).lower()
    lost = isinstance(e, dist.DistError | ConnectionError) or (
        isinstance(e, RuntimeError) and any(w in text for w in _PEER_LOST)
    )
    if lost:
        return ShardGroupError(
            f"the shard group lost a rank or a link between ranks: {type(e).__name__}: {e}"
        )
    return TPMError(f"the shard group failed the request: {type(e).__name__}: {e}")


def sample(logp: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy when ``temperature`` is 0; otherwise temperature and nucleus (top-p) sampling."""
    if temperature <= 0.0:
        return int(torch.argmax(logp))
    probs = torch.softmax(logp / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
