"""The user's side: :class:`TPMClient` builds requests, sends them, and decodes results.

The client talks to a :class:`Transport`, which carries a mode's JSON request and the
caller's token to wherever the mode functions run and returns their JSON reply. The
embedded default uses the local Globus Compute engine
(:class:`tpm_faas.compute.transport.LocalEngineTransport`); the Globus Compute SDK's
``Executor`` slots in as another transport. Tensors go as declared dtype/shape + base64 and
come back as numpy arrays.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tpm_faas.errors import RemoteError

if TYPE_CHECKING:
    import numpy as np


class Transport(Protocol):
    """Carries one mode call; the future resolves to the mode function's JSON reply."""

    def submit(self, mode: str, request_json: str, token: str | None) -> Future[str]: ...


@dataclass(frozen=True)
class Result:
    """A mode's result: its output, the usage it was charged for, and its receipt."""

    request_id: str
    mode: str
    output: dict[str, Any]
    usage: dict[str, Any]
    receipt: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @property
    def texts(self) -> list[str]:
        """Generated texts (query), or the generation under intervention (intervene)."""
        if "completions" in self.output:
            return [c["text"] for c in self.output["completions"]]
        return [self.output.get("text", "")]

    @property
    def text(self) -> str:
        return self.texts[0]

    def tensor(self, key: str = "output") -> np.ndarray:
        """A tensor of the output as a numpy array (``output`` for embed, a site for saves)."""
        if (
            key in self.output
            and isinstance(self.output[key], dict)
            and "dtype" in self.output[key]
        ):
            return decode_array(self.output[key])
        return decode_array(self.output["saved"][key]["tensor"])

    @property
    def saved(self) -> dict[str, np.ndarray]:
        """Saved activations by hook site (intervene)."""
        return {k: decode_array(v["tensor"]) for k, v in self.output.get("saved", {}).items()}


def encode_array(a: Any, dtype: str = "float32") -> dict[str, Any]:
    """A numpy array (or anything ``numpy.asarray`` takes) as a tensor payload."""
    import numpy as np

    arr = np.ascontiguousarray(np.asarray(a, dtype=dtype))
    return {
        "dtype": dtype,
        "shape": list(arr.shape),
        "data": base64.b64encode(arr.tobytes()).decode(),
    }


def decode_array(payload: dict[str, Any]) -> np.ndarray:
    import numpy as np

    if payload["dtype"] != "float32":
        raise ValueError(f"cannot decode dtype {payload['dtype']}")
    raw = base64.b64decode(payload["data"])
    return np.frombuffer(raw, dtype=np.float32).reshape(payload["shape"]).copy()


class TPMClient:
    """Call the three modes of a served model.

    :param transport: how requests reach the mode functions
    :param token: the access token for the TPM resource server
    :param model: the default ``name@version``
    :param timeout_s: how long to wait for each result
    """

    def __init__(
        self,
        transport: Transport,
        *,
        token: str | None = None,
        model: str = "demo-tpm@1",
        timeout_s: float = 600.0,
    ) -> None:
        self.transport = transport
        self.token = token
        self.model = model
        self.timeout_s = timeout_s

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        logprobs: bool = False,
        model: str | None = None,
    ) -> Result:
        """Generate text (greedy when ``temperature`` is 0)."""
        return self.call(
            "query",
            {
                "prompts": [prompts] if isinstance(prompts, str) else list(prompts),
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
                "logprobs": logprobs,
            },
            model=model,
        )

    def embed(
        self,
        inputs_embeds: Any = None,
        *,
        adapter: str | None = None,
        adapter_input: Any = None,
        head: str | None = None,
        pooling: str = "mean",
        model: str | None = None,
    ) -> Result:
        """Run ``inputs_embeds`` ([batch, tokens, hidden]) or an adapter's raw input through
        the frozen core; returns pooled hidden states or ``head``'s output."""
        body: dict[str, Any] = {"pooling": pooling}
        if inputs_embeds is not None:
            body["inputs_embeds"] = encode_array(inputs_embeds)
        if adapter is not None:
            body["adapter"] = adapter
            body["adapter_input"] = encode_array(adapter_input)
        if head is not None:
            body["head"] = head
        return self.call("embed", body, model=model)

    def intervene(
        self,
        prompt: str,
        ops: Sequence[dict[str, Any]],
        *,
        max_new_tokens: int = 0,
        seed: int = 0,
        model: str | None = None,
    ) -> Result:
        """Run ``prompt`` with a declarative list of hook-site reads and writes.

        Tensor values in ``ops`` (e.g. an ``add`` op's ``vector``) may be numpy arrays.
        """
        enc = [{k: encode_array(v) if _is_array(v) else v for k, v in op.items()} for op in ops]
        return self.call(
            "intervene",
            {"prompt": prompt, "ops": enc, "max_new_tokens": max_new_tokens, "seed": seed},
            model=model,
        )

    def call(self, mode: str, body: dict[str, Any], *, model: str | None = None) -> Result:
        """Send one request to ``mode`` and wait for its result."""
        request = {"model": model or self.model, "request_id": str(uuid.uuid4()), **body}
        fut = self.transport.submit(mode, json.dumps(request), self.token)
        return parse_reply(fut.result(timeout=self.timeout_s))


def parse_reply(reply_json: str) -> Result:
    """Decode a mode function's reply; an error record raises :class:`RemoteError`."""
    reply = json.loads(reply_json)
    if not reply.get("ok"):
        raise RemoteError.from_record(reply.get("error") or {})
    return Result(
        request_id=reply["request_id"],
        mode=reply["mode"],
        output=reply["output"],
        usage=reply["usage"],
        receipt=reply["receipt"],
        raw=reply,
    )


def _is_array(v: Any) -> bool:
    return hasattr(v, "__array__") and not isinstance(v, (str, bytes, dict))
