"""The one way into a shard group: JSON messages over a ZeroMQ socket on rank 0.

A message is :class:`~tpm_faas.protocol.shard.ShardMessage` (``op``, ``request_id``,
``body``); the reply is :class:`~tpm_faas.protocol.shard.ShardReply`: ``{"ok": true,
"result": {...}}`` or ``{"ok": false, "error": {"code", "message", "type"}}``.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError

from tpm_faas._extras import require
from tpm_faas.errors import ShardGroupError, ShardTimeout, TPMError
from tpm_faas.protocol.shard import ShardMessage, ShardReply


class ShardClient:
    """A client of one shard group's rank 0.

    :param address: the ZeroMQ address the group registered (``tcp://127.0.0.1:PORT``)
    :param timeout_s: how long to wait for an answer before giving up
    """

    def __init__(self, address: str, *, timeout_s: float = 300.0) -> None:
        self.address = address
        self.timeout_s = timeout_s

    def call(
        self,
        op: str,
        body: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Send one request and wait for its result; errors come back as :class:`TPMError`."""
        zmq = require("zmq", "gateway")
        msg = ShardMessage(op=op, request_id=request_id or str(uuid.uuid4()), body=body or {})
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.address)
            sock.send_multipart([b"", msg.model_dump_json().encode()])
            wait_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
            if not sock.poll(wait_ms, zmq.POLLIN):
                raise ShardTimeout(
                    f"the shard group at {self.address} did not answer {op!r} within "
                    f"{wait_ms / 1000:.0f} s"
                )
            frames = sock.recv_multipart()
        finally:
            sock.close()
        try:
            reply = ShardReply.model_validate_json(frames[-1])
        except ValidationError as e:
            raise ShardGroupError(f"the shard group sent an unreadable reply: {e}") from None
        if reply.ok:
            return reply.result or {}
        raise _error_from(reply.error or {})

    def ping(self, timeout_s: float = 5.0) -> dict[str, Any]:
        return self.call("ping", timeout_s=timeout_s)


def _error_from(record: dict[str, Any]) -> TPMError:
    from tpm_faas import errors

    cls = getattr(errors, str(record.get("type", "")), None)
    message = str(record.get("message", "the shard group failed the request"))
    code = str(record.get("code", "shard_unavailable"))
    if isinstance(cls, type) and issubclass(cls, TPMError) and cls is not errors.RemoteError:
        return cls(message, code=code)
    return ShardGroupError(message, code=code)
