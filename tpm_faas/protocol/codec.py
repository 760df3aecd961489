"""The one tensor codec: a tensor travels as its declared ``dtype`` and ``shape`` and its raw
little-endian bytes in base64, never as a pickle.

Everything here is numpy and the standard library (the runtime adds its torch adapter on top
of :func:`raw` and :func:`encode`). Sizes are checked against the declaration *before*
anything is decoded, and :func:`check` validates the base64 text itself (alphabet and
padding) without decoding it into a buffer, so a request whose tensor cannot be decoded is
refused at admission, not in the shard group.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tpm_faas.errors import TensorError

if TYPE_CHECKING:
    import numpy as np

#: Bytes per element of every dtype a tensor may declare.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
}
#: The dtypes that hold real numbers.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
#: No tensor may be larger than this, whatever a policy says.
MAX_TENSOR_BYTES = 64 * 1024 * 1024

# Standard base64 (RFC 4648 §4): groups of four, '=' padding only at the very end.
_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ``dtype`` and ``shape``.

    :raises TensorError: an unknown dtype
    """
    size = DTYPE_SIZES.get(dtype)
    if size is None:
        raise TensorError(f"unsupported dtype {dtype!r} (one of {', '.join(DTYPE_SIZES)})")
    return math.prod(shape) * size


def b64_length(n: int) -> int:
    """Characters of the base64 text of ``n`` bytes."""
    return 4 * math.ceil(n / 3)


def check(dtype: str, shape: Sequence[int], data: str) -> int:
    """Check a payload's declaration and text without decoding it; return its byte count.

    :raises TensorError: too large, a length that does not match the declaration, or text
        that is not base64
    """
    n = nbytes(dtype, shape)
    if n > MAX_TENSOR_BYTES:
        raise TensorError(
            f"tensor of shape {list(shape)} and dtype {dtype} is {n} bytes; "
            f"the limit is {MAX_TENSOR_BYTES}"
        )
    if len(data) != b64_length(n):
        raise TensorError(
            f"tensor data is {len(data)} base64 characters; shape {list(shape)} and dtype "
            f"{dtype} need {b64_length(n)} ({n} bytes)"
        )
    if _B64.fullmatch(data) is None:
        raise TensorError(
            "tensor data is not valid base64 (standard alphabet A-Z a-z 0-9 + /, '=' padding "
            "only at the end)"
        )
    if len(data) - len(data.rstrip("=")) != -n % 3:  # the '=' padding that n bytes need
        raise TensorError(f"tensor data is not valid base64 ({-n % 3} '=' of padding needed)")
    return n


def raw(payload: dict[str, Any]) -> bytes:
    """The bytes of a payload (``{"dtype", "shape", "data"}``), checked against its declaration.

    :raises TensorError: see :func:`check`
    """
    dtype, shape, data = payload["dtype"], [int(s) for s in payload["shape"]], payload["data"]
    n = check(dtype, shape, data)
    try:
        buf = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:  # pragma: no cover - check() refuses these
        raise TensorError(f"tensor data is not valid base64: {e}") from e
    if len(buf) != n:
        raise TensorError(f"tensor data decodes to {len(buf)} bytes, expected {n}")
    return buf


def encode(buf: bytes, dtype: str, shape: Sequence[int]) -> dict[str, Any]:
    """A payload of raw bytes ``buf`` declared as ``dtype`` and ``shape``."""
    if len(buf) != nbytes(dtype, shape):
        raise TensorError(f"{len(buf)} bytes do not make a {dtype} tensor of shape {shape}")
    return {"dtype": dtype, "shape": list(shape), "data": base64.b64encode(buf).decode("ascii")}


def encode_array(a: Any, dtype: str = "float32") -> dict[str, Any]:
    """A numpy array (or anything ``numpy.asarray`` takes) as a payload of ``dtype``.

    ``bfloat16`` keeps the upper 16 bits of each float32 (rounded to nearest even).
    """
    import numpy as np

    if dtype == "bfloat16":
        f = np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)
        bits = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype("<u2")
        return encode(bits.tobytes(), dtype, bits.shape)
    arr = np.ascontiguousarray(np.asarray(a, dtype=np.dtype(dtype).newbyteorder("<")))
    return encode(arr.tobytes(), dtype, arr.shape)


def decode_array(payload: dict[str, Any]) -> np.ndarray:
    """A payload as a numpy array (``bfloat16`` and ``float16`` widen to float32)."""
    import numpy as np

    buf = raw(payload)
    shape = [int(s) for s in payload["shape"]]
    dtype = payload["dtype"]
    if dtype == "bfloat16":
        bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    arr = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return arr.astype(np.float32) if dtype == "float16" else arr.copy()


def is_payload(obj: Any) -> bool:
    """Whether ``obj`` is an inline payload (a mapping with dtype, shape and data)."""
    return isinstance(obj, dict) and {"dtype", "shape", "data"} <= obj.keys()


def raw_size(payload: dict[str, Any]) -> int:
    """Bytes an inline payload carries, from its base64 length (no decoding)."""
    data: str = payload["data"]
    return 3 * len(data) // 4 - data[-2:].count("=") if data else 0
