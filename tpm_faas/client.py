"""The user's side: :class:`TPMClient` builds requests, sends them, and decodes results.

The client talks to a :class:`Transport`, which carries a mode's JSON request and the
caller's token to wherever the mode functions run and returns their JSON reply. The
embedded default uses the local Globus Compute engine
(:class:`tpm_faas.compute.transport.LocalEngineTransport`); the Globus Compute SDK's
``Executor`` slots in as another transport. Tensors go as declared dtype/shape + base64 (the
wire's one codec, :mod:`tpm_faas.protocol.codec`) and come back as numpy arrays.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol

from tpm_faas.errors import RemoteError, TaskTimeout
from tpm_faas.protocol.codec import decode_array, encode_array
from tpm_faas.protocol.replies import (
    EmbedOutput,
    ErrorReply,
    InterveneOutput,
    InterveneRun,
    QueryOutput,
    Receipt,
    Reply,
    Saved,
    TensorOut,
    Usage,
)

if TYPE_CHECKING:
    import numpy as np
    from tenacity import RetryCallState

    from tpm_faas.replay import ReplayReport

log = logging.getLogger(__name__)


class Transport(Protocol):
    """Carries one mode call; the future resolves to the mode function's JSON reply."""

    def submit(self, mode: str, request_json: str, token: str | None) -> Future[str]: ...


@dataclass(frozen=True)
class Result:
    """A mode's result: its output, the usage it was charged for, and its receipt, read
    through the wire's typed replies (:mod:`tpm_faas.protocol.replies`).

    ``output`` is the mode's output model (:class:`~tpm_faas.protocol.replies.QueryOutput`,
    :class:`~tpm_faas.protocol.replies.EmbedOutput` or
    :class:`~tpm_faas.protocol.replies.InterveneOutput`), ``usage`` a
    :class:`~tpm_faas.protocol.replies.Usage` and ``receipt`` a
    :class:`~tpm_faas.protocol.replies.Receipt`; each also answers ``["field"]`` like the JSON.

    Tensors come back inline or, for large results, in a safetensors file named by
    ``output.tensors_ref``; :meth:`tensor`, :attr:`saved` and :meth:`saved_for` load either
    transparently (the file's sha256 is checked first). ``results_dir`` is where to look for
    that file when its ``uri`` is not readable here (e.g. after a Globus transfer).
    """

    request_id: str
    mode: str
    output: Any
    usage: Usage
    receipt: Receipt
    raw: dict[str, Any] = field(repr=False)
    results_dir: Path | None = field(default=None, repr=False)
    #: The request as this client sent it (what :meth:`TPMClient.replay` sends again).
    request: dict[str, Any] | None = field(default=None, repr=False)
    _file: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def runs(self) -> list[Any]:
        """Per prompt: completions (query) or runs under the intervention (intervene)."""
        if isinstance(self.output, QueryOutput):
            return list(self.output.completions)
        if isinstance(self.output, InterveneOutput):
            return list(self.output.results)
        return []

    @property
    def texts(self) -> list[str]:
        """Generated texts: one per prompt (query), or under intervention (intervene)."""
        return [c.text for c in self.runs]

    @property
    def text(self) -> str:
        return self.texts[0]

    def tensor(self, key: str = "output") -> np.ndarray:
        """The embed mode's output tensor (``output``), or a saved site of the first prompt."""
        if isinstance(self.output, EmbedOutput) and key == "output":
            return self.array(self.output.output)
        return self.saved[key]

    @property
    def saved(self) -> dict[str, np.ndarray]:
        """Saved activations of the first prompt, by hook site (intervene)."""
        return self.saved_for(0)

    def saved_for(self, prompt: int) -> dict[str, np.ndarray]:
        """Saved activations of prompt ``prompt``, by hook site: ``[positions, *shape]``
        (which position each row is: :meth:`saved_entry`)."""
        return {k: self.array(v.tensor) for k, v in self._run(prompt).saved.items()}

    def saved_entry(self, site: str, prompt: int = 0) -> Saved:
        """A saved site of prompt ``prompt`` as it came back: ``tensor``, the token
        ``positions`` of its rows and, for ``attn.hook_z``, the ``heads`` of its head rows."""
        run = self._run(prompt)
        if site not in run.saved:
            known = ", ".join(sorted(run.saved)) or "none"
            raise KeyError(f"prompt {prompt} saved no {site!r} (saved: {known})")
        return run.saved[site]

    def saved_ref(self, site: str, prompt: int = 0) -> dict[str, str]:
        """A reference to a saved site of this result, for a later request's ``tensors``.

        The site reads the values from its results directory instead of you sending them back;
        it only works for results that came back by reference (``tensors_ref``), for their
        owner, on the site that served them. The reference pins the file's sha256.

        :raises ValueError: if this result's tensors came back inline (send the array instead)
        """
        payload = self.saved_entry(site, prompt).tensor
        ref = self.output.tensors_ref
        if ref is None or payload.key is None:
            raise ValueError(
                "this result's tensors came back inline; send the array itself "
                f"(result.saved_for({prompt})[{site!r}])"
            )
        return {"result": self.request_id, "key": payload.key, "sha256": ref.sha256}

    @property
    def logit_lens(self) -> list[dict[str, Any]]:
        """The logit-lens rows of the first prompt (intervene); :meth:`logit_lens_for` gives
        any prompt's."""
        return self.logit_lens_for(0)

    def logit_lens_for(self, prompt: int) -> list[dict[str, Any]]:
        """The logit-lens rows of prompt ``prompt`` (intervene), one per layer and position."""
        return list(self._run(prompt).logit_lens)

    def array(self, payload: TensorOut | dict[str, Any]) -> np.ndarray:
        """A tensor of this result as a numpy array, inline or from the results file."""
        if isinstance(payload, dict):
            payload = TensorOut.model_validate(payload)
        if payload.data is not None:
            return decode_array(payload.model_dump(exclude_none=True))
        if not self._file:
            ref = self.output.tensors_ref
            self._file.update(load_results_file(ref.model_dump(), self.results_dir))
        return self._file[str(payload.key)]

    def _run(self, prompt: int) -> InterveneRun:
        if not isinstance(self.output, InterveneOutput):
            raise TypeError(f"a {self.mode} result has no saved sites")
        return self.output.results[prompt]


def load_results_file(ref: dict[str, Any], results_dir: Path | None = None) -> dict[str, Any]:
    """The arrays of a by-reference result, after checking the file's sha256."""
    import hashlib
    from urllib.parse import unquote, urlparse

    from safetensors.numpy import load

    candidates = [Path(unquote(urlparse(ref["uri"]).path))]
    if results_dir is not None:
        candidates.insert(0, Path(results_dir) / ref["name"])
    for path in candidates:
        if path.is_file():
            data = path.read_bytes()
            break
    else:
        raise FileNotFoundError(
            f"result file {ref['name']} not found (looked in {', '.join(map(str, candidates))})"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref["sha256"]:
        raise ValueError(f"result file {path} has sha256 {digest}, expected {ref['sha256']}")
    return dict(load(data))


#: Codes of failures that a resend of the same request can get past. The gateway raises them
#: before the request's hold (``rate_limited``, ``ledger_unavailable``) or voids the hold
#: after them (``shard_unavailable``, ``shard_timeout``), so nothing was charged; the client
#: sends ``task_failed`` (the task, not the request, failed) again only when the endpoint
#: lost its worker or could not be reached (:func:`_transient`). Safety does not rest on that
#: alone: every resend carries the same request id, and the ledger holds an id again only if
#: its earlier attempt was voided or never held. One that was held or charged after all (a
#: worker lost after the charge, a commit whose answer was lost) makes the resend
#: ``duplicate_request``, raised with the earlier failure as its cause: never a second
#: charge. Other codes are never resent: ``internal`` may come after the charge, and a
#: ``client_timeout``'s task may still be running.
RETRIED_CODES = frozenset(
    {"rate_limited", "shard_unavailable", "shard_timeout", "ledger_unavailable", "task_failed"}
)
#: A task failure whose text says the endpoint lost the worker or its manager (Parsl's
#: ``WorkerLost``/``ManagerLost``, as Globus Compute reports them).
_LOST = re.compile(r"\b(WorkerLost|ManagerLost)\b")

_P = ParamSpec("_P")


@dataclass(frozen=True)
class _Call:
    """One request to send, and the caller's retry bounds for it (``None``: the client's)."""

    mode: str
    request: dict[str, Any]
    deadline_s: float | None = None
    retries: int | None = None


class RequestFuture(Future["Result"]):
    """The future of one request's :class:`Result`; ``request_id`` names the request (the
    same for every retry of it)."""

    def __init__(self, request_id: str) -> None:
        super().__init__()
        self.request_id = request_id


#: The client method of a mode whose name is not the mode's own.
_METHODS = {"query": "generate"}


def _blocking(
    build: Callable[Concatenate[TPMClient, _P], _Call],
) -> Callable[Concatenate[TPMClient, _P], Result]:
    """The blocking method of a request builder: send, retry as needed, return the result."""

    def call(self: TPMClient, /, *args: _P.args, **kwargs: _P.kwargs) -> Result:
        return self._run(build(self, *args, **kwargs))

    name = build.__name__.lstrip("_")
    call.__name__, call.__qualname__ = name, f"TPMClient.{name}"
    call.__doc__ = (
        f"{(build.__doc__ or '').rstrip()}\n\n"
        f"        Waits for the result (:meth:`submit_{name}` returns a future of it)."
    )
    call.__signature__ = inspect.signature(build).replace(  # type: ignore[attr-defined]
        return_annotation="Result"
    )
    return call


def _submitting(
    build: Callable[Concatenate[TPMClient, _P], _Call],
) -> Callable[Concatenate[TPMClient, _P], RequestFuture]:
    """The future-returning method of a request builder."""

    def submit(self: TPMClient, /, *args: _P.args, **kwargs: _P.kwargs) -> RequestFuture:
        return self._submit(build(self, *args, **kwargs))

    name = build.__name__.lstrip("_")
    submit.__name__, submit.__qualname__ = f"submit_{name}", f"TPMClient.submit_{name}"
    submit.__signature__ = inspect.signature(build).replace(  # type: ignore[attr-defined]
        return_annotation="RequestFuture"
    )
    submit.__doc__ = (
        f"{(build.__doc__ or '').rstrip()}\n\n"
        "        Returns at once: a :class:`RequestFuture` of the result, with at most\n"
        f"        ``max_concurrent`` requests of this client in flight (:meth:`{name}` waits)."
    )
    return submit


class TPMClient:
    """Call the three modes of a served model.

    Each mode has a blocking method (:meth:`generate`, :meth:`embed`, :meth:`intervene`) and
    one that returns a future at once (:meth:`submit_generate`, ...); :meth:`map` runs one
    of them over many inputs. Refusals that a resend can get past (:data:`RETRIED_CODES`) are
    retried with the same request id: a ``rate_limited`` refusal after its ``retry_after_s``,
    the others after an exponential backoff with jitter, until ``retries`` resends or
    ``deadline_s`` is spent; then the last error is raised.

    :param transport: how requests reach the mode functions
    :param token: the access token for the TPM resource server, or a callable returning one
        before each request (:class:`tpm_faas.globus_auth.GlobusTokens`: user login or client
        credentials, refreshed as needed)
    :param model: the default ``name@version``
    :param timeout_s: how long to wait for each reply (:class:`~tpm_faas.errors.TaskTimeout`
        after that)
    :param results_dir: where by-reference results are found, if not at their ``uri``
    :param max_concurrent: how many requests the futures of this client keep in flight at
        most (:meth:`submit_generate`, :meth:`map`); blocking calls run in their caller's
        thread
    :param retries: how many times a request is sent again after a failure it can get past
        (``0``: never); each method also takes ``retries``
    :param deadline_s: the time a call may take, retries and their waits included (default:
        ``timeout_s``); each method also takes ``deadline_s``
    :param max_retry_wait_s: the longest wait before one resend (a longer ``retry_after_s``
        is cut to it)
    :param backoff_s: the first backoff (doubled at each resend, plus up to as much jitter)
    :param sleep: how to wait between attempts (tests pass a fake clock's)
    :param clock: the monotonic clock deadlines are measured with
    """

    def __init__(
        self,
        transport: Transport,
        *,
        token: str | Callable[[], str] | None = None,
        model: str = "demo-tpm@1",
        timeout_s: float = 600.0,
        results_dir: Path | None = None,
        max_concurrent: int = 8,
        retries: int = 5,
        deadline_s: float | None = None,
        max_retry_wait_s: float = 60.0,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if retries < 0:
            raise ValueError("retries cannot be negative")
        self.results_dir = results_dir
        self.transport = transport
        self.token = token
        self.model = model
        self.timeout_s = timeout_s
        self.max_concurrent = max_concurrent
        self.retries = retries
        self.deadline_s = deadline_s
        self.max_retry_wait_s = max_retry_wait_s
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._clock = clock
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- the three modes: one request builder each, sent blocking or as a future -------------
    def _generate(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        chats: Sequence[Sequence[Mapping[str, str]]] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        logprobs: bool = False,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        model: str | None = None,
        reproducible: bool = False,
        deadline_s: float | None = None,
        retries: int | None = None,
    ) -> _Call:
        """Generate text (greedy when ``temperature`` is 0) for ``prompts``, or for one
        conversation (``messages``: ``[{"role": "user", "content": "..."}]``) or several
        (``chats``) rendered with the model's chat template. Generation stops at EOS,
        ``stop_token_ids``, or one of the ``stop`` strings (cut from the text)."""
        body: dict[str, Any] = {
            **_inputs(prompts, messages, chats),
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "logprobs": logprobs,
        }
        if stop:
            body["stop"] = list(stop)
        if stop_token_ids:
            body["stop_token_ids"] = list(stop_token_ids)
        return self._request("query", body, model, reproducible, deadline_s, retries)

    def _embed(
        self,
        inputs_embeds: Any = None,
        *,
        prompts: str | Sequence[str] | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        chats: Sequence[Sequence[Mapping[str, str]]] | None = None,
        adapter: str | None = None,
        adapter_input: Any = None,
        head: str | None = None,
        pooling: str = "mean",
        model: str | None = None,
        reproducible: bool = False,
        deadline_s: float | None = None,
        retries: int | None = None,
    ) -> _Call:
        """Run ``inputs_embeds`` ([batch, tokens, hidden]), an adapter's raw input, or text
        (``prompts``, ``messages``, ``chats``: through the model's own tokenizer) through the
        frozen core; returns pooled hidden states or ``head``'s output, one row per input."""
        body: dict[str, Any] = {"pooling": pooling}
        if prompts is not None or messages is not None or chats is not None:
            body.update(_inputs(prompts, messages, chats))
        if inputs_embeds is not None:
            body["inputs_embeds"] = encode_array(inputs_embeds)
        if adapter is not None:
            body["adapter"] = adapter
            body["adapter_input"] = encode_array(adapter_input)
        if head is not None:
            body["head"] = head
        return self._request("embed", body, model, reproducible, deadline_s, retries)

    def _intervene(
        self,
        prompts: str | Sequence[str] | None,
        ops: Sequence[dict[str, Any]],
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        chats: Sequence[Sequence[Mapping[str, str]]] | None = None,
        tensors: dict[str, Any] | None = None,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        model: str | None = None,
        reproducible: bool = False,
        deadline_s: float | None = None,
        retries: int | None = None,
    ) -> _Call:
        """Run ``prompts`` (or chats: ``messages``, ``chats``) under a declarative list of
        hook-site reads and writes; positions index the tokens the model's tokenizer makes.

        Tensor values in ``ops`` (``set``'s ``value``, ``add``'s ``vector``) and in
        ``tensors`` (named once, used by ``{"ref": name}``) may be numpy arrays; a ``tensors``
        entry may also be an earlier by-reference result's tensor (:meth:`Result.saved_ref`).
        """
        enc = [{k: encode_array(v) if _is_array(v) else v for k, v in op.items()} for op in ops]
        body: dict[str, Any] = {
            **_inputs(prompts, messages, chats),
            "ops": enc,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }
        if tensors:
            body["tensors"] = {
                k: v if isinstance(v, dict) else encode_array(v) for k, v in tensors.items()
            }
        return self._request("intervene", body, model, reproducible, deadline_s, retries)

    generate = _blocking(_generate)
    submit_generate = _submitting(_generate)
    embed = _blocking(_embed)
    submit_embed = _submitting(_embed)
    intervene = _blocking(_intervene)
    submit_intervene = _submitting(_intervene)

    def map(
        self, mode_or_method: str | Callable[..., Any], inputs: Iterable[Any], **common: Any
    ) -> Iterator[Result]:
        """Run one mode over many ``inputs``, like ``concurrent.futures.Executor.map``: every
        request is submitted now (at most ``max_concurrent`` in flight), and the iterator
        yields the results in the order of ``inputs``, raising the first error where its
        input comes (the requests not yet started are then cancelled).

        :param mode_or_method: ``"generate"`` (or ``"query"``), ``"embed"``, ``"intervene"``,
            or one of this client's methods for them (``client.generate``)
        :param inputs: each a mapping of keyword arguments, or else the method's first
            argument (``prompts`` of generate and intervene, ``inputs_embeds`` of embed)
        :param common: keyword arguments of every request (e.g. ``ops``, ``max_new_tokens``)
        """
        submit = self._submitter(mode_or_method)
        futures: list[Future[Result]] = []
        try:
            for x in inputs:
                futures.append(
                    submit(**{**common, **x}) if isinstance(x, Mapping) else submit(x, **common)
                )
        except BaseException:  # a bad input: nothing of this map goes on
            for f in futures:
                f.cancel()
            raise

        def results() -> Iterator[Result]:
            try:
                for f in futures:
                    yield f.result()
            finally:
                for f in futures:
                    f.cancel()

        return results()

    def call(
        self,
        mode: str,
        body: dict[str, Any],
        *,
        model: str | None = None,
        reproducible: bool = False,
        deadline_s: float | None = None,
        retries: int | None = None,
    ) -> Result:
        """Send one request to ``mode`` (a name of :data:`tpm_faas.modes.MODES`) and wait for
        its result. ``reproducible``: run it batch-invariantly, so :meth:`replay` gives the
        same bits (the site may price it higher)."""
        return self._run(self._request(mode, body, model, reproducible, deadline_s, retries))

    def replay(self, result: Result, request: Mapping[str, Any] | None = None) -> ReplayReport:
        """Run ``result``'s request again on the version its receipt names (``@latest``
        resolved then) and compare: :attr:`ReplayReport.identical`, or where the replay
        first differs (prompt, token index, site, largest difference).

        :param request: the request as sent (default: the one this client kept on ``result``)
        :raises RequestError: ``request`` is not the one the receipt was issued for
        """
        from tpm_faas.replay import compare, replay_request

        sent = request if request is not None else result.request
        if sent is None:
            raise ValueError("this result carries no request; pass the request it was made from")
        again = self._run(
            _Call(result.mode, replay_request(result.mode, dict(sent), result.receipt))
        )
        return compare(result, again)

    def close(self) -> None:
        """Wait for the requests submitted as futures and stop their threads."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> TPMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending ------------------------------------------------------------------------
    def _request(
        self,
        mode: str,
        body: dict[str, Any],
        model: str | None,
        reproducible: bool,
        deadline_s: float | None,
        retries: int | None,
    ) -> _Call:
        request = {"model": model or self.model, "request_id": str(uuid.uuid4()), **body}
        if reproducible:
            request["reproducible"] = True
        return _Call(mode, request, deadline_s, retries)

    def _submitter(self, mode_or_method: str | Callable[..., Any]) -> Callable[..., Future[Result]]:
        if callable(mode_or_method):
            name = getattr(mode_or_method, "__name__", "")
            if getattr(mode_or_method, "__self__", None) is not self:
                raise ValueError("map takes a mode name or a method of this client")
        else:
            name = mode_or_method
        from tpm_faas.modes import MODE_NAMES

        methods = [_METHODS.get(m, m) for m in MODE_NAMES]  # a method per mode
        name = _METHODS.get(name, name).removeprefix("submit_")
        if name not in methods:
            raise ValueError(
                f"map runs {', '.join(methods)} (or a mode's name), not {mode_or_method!r}"
            )
        submit: Callable[..., Future[Result]] = getattr(self, f"submit_{name}")
        return submit

    def _submit(self, call: _Call) -> RequestFuture:
        fut = RequestFuture(call.request["request_id"])

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(self._run(call))
            except BaseException as e:  # the caller gets it from the future
                fut.set_exception(e)

        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.max_concurrent, thread_name_prefix="tpm-client"
                )
            self._pool.submit(run)
        return fut

    def _run(self, call: _Call) -> Result:
        """Send ``call`` and wait for its result; resend it (same request id) after failures
        it can get past, within its retries and deadline."""
        from tenacity import Retrying, retry_if_exception, wait_exponential, wait_random

        retries = self.retries if call.retries is None else call.retries
        budget = call.deadline_s if call.deadline_s is not None else self.deadline_s
        deadline = self._clock() + (self.timeout_s if budget is None else budget)
        backoff = wait_exponential(
            multiplier=self.backoff_s, max=self.max_retry_wait_s
        ) + wait_random(0, self.backoff_s)

        def wait(state: RetryCallState) -> float:
            assert state.outcome is not None
            e = state.outcome.exception()
            if isinstance(e, RemoteError) and e.retry_after_s is not None:
                after = min(e.retry_after_s, self.max_retry_wait_s)
                return after + random.uniform(0.0, min(1.0, 0.1 * after))  # no stampede
            return float(backoff(state))

        def stop(state: RetryCallState) -> bool:
            spent = state.attempt_number > retries
            return spent or self._clock() + state.upcoming_sleep >= deadline

        def before_sleep(state: RetryCallState) -> None:
            assert state.outcome is not None
            log.info(
                "request %s: %s; sending it again in %.1f s (attempt %d)",
                call.request["request_id"],
                state.outcome.exception(),
                state.upcoming_sleep,
                state.attempt_number + 1,
            )

        earlier: RemoteError | None = None
        for attempt in Retrying(
            retry=retry_if_exception(_retried),
            wait=wait,
            stop=stop,
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                try:
                    result = self._send(call.mode, call.request, deadline)
                except RemoteError as e:
                    if e.code == "duplicate_request" and earlier is not None:
                        e.add_note(
                            f"the site admitted an earlier attempt of request {e.request_id}, "
                            f"which ended in: {earlier}; it may have been charged"
                        )
                        raise e from earlier
                    earlier = e
                    raise
        return result

    def _send(self, mode: str, request: dict[str, Any], deadline: float) -> Result:
        """One attempt: submit ``request`` and wait for the reply, until ``timeout_s`` or the
        ``deadline``, whichever comes first."""
        from tpm_faas.modes import get_mode

        token = self.token() if callable(self.token) else self.token
        rid = request["request_id"]
        try:
            fut = self.transport.submit(get_mode(mode).name, json.dumps(request), token)
        except Exception as e:  # refused at submission (a service down, a broken executor)
            raise _task_failed(mode, rid, e, None) from e
        wait_s = max(0.0, min(self.timeout_s, deadline - self._clock()))
        try:
            reply = fut.result(timeout=wait_s)
        except TimeoutError as e:
            if fut.done():  # the task itself ended with a TimeoutError
                raise _task_failed(mode, rid, e, _task_id(fut)) from e
            fut.cancel()
            task = _task_id(fut)
            raise TaskTimeout(
                f"no reply to {mode} request {rid}"
                + (f" (Globus Compute task {task})" if task else "")
                + f" within {wait_s:.1f} s; it may still run, and be charged, on the endpoint",
                request_id=rid,
                task_id=task,
            ) from None
        except RemoteError:
            raise
        except Exception as e:  # the task itself failed (worker lost, refused by the endpoint)
            raise _task_failed(mode, rid, e, _task_id(fut)) from e
        return replace(parse_reply(reply, results_dir=self.results_dir), request=request)


def _task_failed(mode: str, request_id: str, e: BaseException, task: str | None) -> RemoteError:
    return RemoteError(
        f"the {mode} task failed on the endpoint: {type(e).__name__}: {e}",
        code="task_failed",
        remote_type=type(e).__name__,
        request_id=request_id,
        layer="compute",
        task_id=task,
    )


def _task_id(fut: Future[Any]) -> str | None:
    """The Globus Compute task id of a transport's future (``ComputeFuture.task_id``), if any."""
    task = getattr(fut, "task_id", None)
    return str(task) if task else None


def _transient(e: BaseException | None) -> bool:
    """Whether a task failure (the cause of a ``task_failed``) can pass when sent again: the
    endpoint or the service could not be reached, or the worker running it was lost."""
    if e is None:
        return False
    if isinstance(e, ConnectionError):
        return True
    return bool(_LOST.search(f"{type(e).__name__}: {getattr(e, 'remote_data', '')} {e}"))


def _retried(e: BaseException) -> bool:
    """Whether the client sends a request again after ``e`` (see :data:`RETRIED_CODES`)."""
    if not isinstance(e, RemoteError) or e.code not in RETRIED_CODES:
        return False
    if e.code == "rate_limited":  # no retry_after_s: the request can never pass
        return e.retry_after_s is not None
    if e.code == "task_failed":
        return _transient(e.__cause__)
    return True


def parse_reply(reply_json: str, results_dir: Path | None = None) -> Result:
    """Decode a mode function's reply; an error record raises :class:`RemoteError`."""
    from tpm_faas.modes import get_mode

    raw = json.loads(reply_json)
    if not isinstance(raw, dict) or not raw.get("ok"):
        error = ErrorReply.model_validate(raw if isinstance(raw, dict) else {}).error
        raise RemoteError.from_record(error.model_dump())
    reply = Reply.model_validate(raw)
    return Result(
        request_id=reply.request_id,
        mode=reply.mode,
        output=get_mode(reply.mode).output_model.model_validate(reply.output),
        usage=reply.usage,
        receipt=reply.receipt,
        raw=raw,
        results_dir=results_dir,
    )


def _is_array(v: Any) -> bool:
    return hasattr(v, "__array__") and not isinstance(v, (str, bytes, dict))


__all__ = [
    "RETRIED_CODES",
    "RequestFuture",
    "Result",
    "TPMClient",
    "Transport",
    "decode_array",
    "encode_array",
    "load_results_file",
    "parse_reply",
]


def _inputs(
    prompts: str | Sequence[str] | None,
    messages: Sequence[Mapping[str, str]] | None,
    chats: Sequence[Sequence[Mapping[str, str]]] | None,
) -> dict[str, Any]:
    """The text part of a request: ``prompts`` or ``chats`` (one of them)."""
    given = [x is not None for x in (prompts, messages, chats)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompts, messages or chats")
    if prompts is not None:
        return {"prompts": [prompts] if isinstance(prompts, str) else list(prompts)}
    if messages is not None:
        return {"chats": [[dict(m) for m in messages]]}
    assert chats is not None
    return {"chats": [[dict(m) for m in chat] for chat in chats]}
