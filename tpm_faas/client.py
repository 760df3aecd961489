"""The user's side: :class:`TPMClient` builds requests, sends them, and decodes results.

The client talks to a :class:`Transport`, which carries a mode's JSON request and the
caller's token to wherever the mode functions run and returns their JSON reply. The
embedded default uses the local Globus Compute engine
(:class:`tpm_faas.compute.transport.LocalEngineTransport`); the Globus Compute SDK's
``Executor`` slots in as another transport. Tensors go as declared dtype/shape + base64 (the
wire's one codec, :mod:`tpm_faas.protocol.codec`) and come back as numpy arrays.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tpm_faas.errors import RemoteError
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

    from tpm_faas.replay import ReplayReport


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
        """The logit-lens rows of the first prompt (intervene)."""
        return list(self._run(0).logit_lens)

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


class TPMClient:
    """Call the three modes of a served model.

    :param transport: how requests reach the mode functions
    :param token: the access token for the TPM resource server, or a callable returning one
        before each request (:class:`tpm_faas.globus_auth.GlobusTokens`: user login or client
        credentials, refreshed as needed)
    :param model: the default ``name@version``
    :param timeout_s: how long to wait for each result
    :param results_dir: where by-reference results are found, if not at their ``uri``
    """

    def __init__(
        self,
        transport: Transport,
        *,
        token: str | Callable[[], str] | None = None,
        model: str = "demo-tpm@1",
        timeout_s: float = 600.0,
        results_dir: Path | None = None,
    ) -> None:
        self.results_dir = results_dir
        self.transport = transport
        self.token = token
        self.model = model
        self.timeout_s = timeout_s

    def generate(
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
    ) -> Result:
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
        return self.call("query", body, model=model, reproducible=reproducible)

    def embed(
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
    ) -> Result:
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
        return self.call("embed", body, model=model, reproducible=reproducible)

    def intervene(
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
    ) -> Result:
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
        return self.call("intervene", body, model=model, reproducible=reproducible)

    def call(
        self,
        mode: str,
        body: dict[str, Any],
        *,
        model: str | None = None,
        reproducible: bool = False,
    ) -> Result:
        """Send one request to ``mode`` (a name of :data:`tpm_faas.modes.MODES`) and wait for
        its result. ``reproducible``: run it batch-invariantly, so :meth:`replay` gives the
        same bits (the site may price it higher)."""
        request = {"model": model or self.model, "request_id": str(uuid.uuid4()), **body}
        if reproducible:
            request["reproducible"] = True
        return self._send(mode, request)

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
        again = self._send(result.mode, replay_request(result.mode, dict(sent), result.receipt))
        return compare(result, again)

    def _send(self, mode: str, request: dict[str, Any]) -> Result:
        from tpm_faas.modes import get_mode

        token = self.token() if callable(self.token) else self.token
        fut = self.transport.submit(get_mode(mode).name, json.dumps(request), token)
        try:
            reply = fut.result(timeout=self.timeout_s)
        except TimeoutError:
            raise
        except RemoteError:
            raise
        except Exception as e:  # the task itself failed (worker lost, refused by the endpoint)
            raise RemoteError(
                f"the {mode} task failed on the endpoint: {type(e).__name__}: {e}",
                code="task_failed",
                remote_type=type(e).__name__,
                request_id=request["request_id"],
                layer="compute",
            ) from e
        return replace(parse_reply(reply, results_dir=self.results_dir), request=request)


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
