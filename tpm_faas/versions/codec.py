"""A lossless codec for one tensor, alone or as a delta against its parent version.

Tensors are their raw little-endian words (``numpy`` ``uint8``/``uint16``/``uint32`` arrays)
plus a dtype name, so nothing here needs torch or ml_dtypes, and every bit pattern (NaN
payloads, infinities, negative zero, subnormals) round-trips: no step ever looks at a float's
value. Four encodings, each ending in *byte grouping* (a word's bytes split into planes, the
most significant plane first) and, except ``raw``, zstd:

``raw``
    the words' bytes, grouped; nothing else.
``zstd``
    the grouped words, zstd-compressed (ZipNN's scheme).
``xor``
    the words XOR the parent's words, grouped, zstd (BitX, ZipLLM's scheme).
``step``
    the distance in representable steps from the parent: each bit pattern is mapped to an
    integer that is monotone in the float's order (sign-magnitude to two's order), the parent's
    is subtracted (modulo 2**bits, so every pattern is reachable), the difference is zigzag
    folded so small moves either way are small numbers, and the entries are ordered by the
    parent's exponent field (a stable argsort the decoder recomputes from the parent, so the
    order costs nothing to store); then grouped and zstd'd.

:func:`best` tries every applicable encoding (the delta ones only with a parent of the same
dtype and shape) and keeps the smallest. The :class:`Encoded` record (``to_json`` for the
manifest; the payload bytes travel separately) names the encoding, dtype, shape and the sha256
of the decoded words; :func:`decode` checks sizes before allocating and the hash after, and
raises :class:`~tpm_faas.errors.VersionError` naming the tensor when anything disagrees.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

import numpy as np
import numpy.typing as npt

from tpm_faas.errors import VersionError

Encoding = Literal["raw", "zstd", "xor", "step"]
#: Every encoding, in the order :func:`best` prefers them on a tie (no parent needed first).
ENCODINGS: Final[tuple[Encoding, ...]] = ("raw", "zstd", "xor", "step")
#: Encodings that need the parent's words to decode.
DELTA_ENCODINGS: Final[frozenset[str]] = frozenset({"xor", "step"})
#: zstd level unless told otherwise.
DEFAULT_LEVEL: Final = 3

Words = npt.NDArray[np.unsignedinteger[Any]]


@dataclass(frozen=True)
class DType:
    """A floating-point format as raw words: its word type and where its exponent field is."""

    name: str
    word: np.dtype[Any]
    mantissa_bits: int
    exponent_bits: int

    @property
    def bits(self) -> int:
        return self.word.itemsize * 8

    @property
    def itemsize(self) -> int:
        return self.word.itemsize


#: The dtypes the codec stores, by name.
DTYPES: Final[dict[str, DType]] = {
    d.name: d
    for d in (
        DType("bfloat16", np.dtype("<u2"), 7, 8),
        DType("float16", np.dtype("<u2"), 10, 5),
        DType("float32", np.dtype("<u4"), 23, 8),
        DType("float8_e4m3fn", np.dtype("<u1"), 3, 4),
    )
}


@dataclass(frozen=True)
class Encoded:
    """One tensor, encoded: the manifest record (:meth:`to_json`) plus the payload bytes.

    :param encoding: one of :data:`ENCODINGS`
    :param dtype: one of :data:`DTYPES`
    :param shape: the tensor's shape
    :param sha256: hex sha256 of the decoded words (little-endian bytes)
    :param nbytes: the payload's length in bytes
    :param level: the zstd level used (0 for ``raw``)
    :param parent_sha256: for a delta encoding, the sha256 of the parent's words it needs
    :param name: the tensor's name, used in error messages
    :param payload: the encoded bytes (not part of :meth:`to_json`)
    """

    encoding: Encoding
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    nbytes: int
    level: int = DEFAULT_LEVEL
    parent_sha256: str | None = None
    name: str = ""
    payload: bytes = field(default=b"", repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The manifest record: everything but the payload."""
        return {
            "encoding": self.encoding,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "sha256": self.sha256,
            "nbytes": self.nbytes,
            "level": self.level,
            "parent_sha256": self.parent_sha256,
            "name": self.name,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any], payload: bytes = b"") -> Encoded:
        """The record :meth:`to_json` wrote, with its payload; malformed records are refused."""
        name = str(record.get("name", ""))
        try:
            encoding = str(record["encoding"])
            dtype = str(record["dtype"])
            shape = tuple(int(s) for s in record["shape"])
            sha = str(record["sha256"])
            nbytes = int(record["nbytes"])
            level = int(record.get("level", DEFAULT_LEVEL))
            parent = record.get("parent_sha256")
        except (KeyError, TypeError, ValueError) as e:
            raise VersionError(f"tensor {name!r}: malformed manifest record ({e!r})") from e
        if encoding not in ENCODINGS:
            raise VersionError(f"tensor {name!r}: unknown encoding {encoding!r}")
        if dtype not in DTYPES:
            raise VersionError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if any(s < 0 for s in shape):
            raise VersionError(f"tensor {name!r}: negative dimension in shape {list(shape)}")
        return cls(
            encoding=encoding,
            dtype=dtype,
            shape=shape,
            sha256=sha,
            nbytes=nbytes,
            level=level,
            parent_sha256=None if parent is None else str(parent),
            name=name,
            payload=payload,
        )


def _dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise VersionError(
            f"unsupported dtype {name!r}; the codec stores {', '.join(DTYPES)}"
        ) from None


def _words(a: npt.NDArray[Any], dt: DType, what: str) -> Words:
    """``a`` as contiguous little-endian words of ``dt`` (any array of the same item size)."""
    arr = np.asarray(a)
    if arr.dtype.itemsize != dt.itemsize:
        raise VersionError(
            f"{what}: {arr.dtype} items are {arr.dtype.itemsize} bytes; "
            f"{dt.name} words are {dt.itemsize}"
        )
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
    return cast(Words, arr.view(dt.word))


def _sha256(words: Words) -> str:
    return hashlib.sha256(np.ascontiguousarray(words).view(np.uint8).data).hexdigest()


def _group(words: Words) -> bytes:
    """The words' bytes as planes, the most significant plane first."""
    flat = words.reshape(-1)
    size = flat.dtype.itemsize
    if size == 1:
        return flat.tobytes()
    return np.ascontiguousarray(flat.view(np.uint8).reshape(-1, size)[:, ::-1].T).tobytes()


def _ungroup(data: bytes, dt: DType) -> Words:
    size = dt.itemsize
    planes = np.frombuffer(data, dtype=np.uint8)
    if size == 1:
        return cast(Words, planes.copy().view(dt.word))
    out = np.ascontiguousarray(planes.reshape(size, -1)[::-1].T)
    return cast(Words, out.view(dt.word).reshape(-1))


def _ordered(words: Words, dt: DType) -> Words:
    """Bit patterns mapped to integers in the floats' order (positive: set the sign bit;
    negative: invert all bits), so the difference counts representable steps."""
    sign = dt.word.type(1 << (dt.bits - 1))
    negative = (words & sign) != 0
    return cast(Words, np.where(negative, ~words, words | sign).astype(dt.word, copy=False))


def _unordered(ordered: Words, dt: DType) -> Words:
    sign = dt.word.type(1 << (dt.bits - 1))
    positive = (ordered & sign) != 0
    return cast(Words, np.where(positive, ordered ^ sign, ~ordered).astype(dt.word, copy=False))


def _signed(dt: DType) -> np.dtype[Any]:
    return np.dtype(f"<i{dt.itemsize}")


def _zigzag(diff: Words, dt: DType) -> Words:
    s = diff.view(_signed(dt))
    return cast(Words, ((s << 1) ^ (s >> (dt.bits - 1))).view(dt.word))


def _unzigzag(z: Words, dt: DType) -> Words:
    one = dt.word.type(1)
    return cast(Words, (z >> one) ^ (dt.word.type(0) - (z & one)))


def _parent_order(parent: Words, dt: DType) -> npt.NDArray[np.intp]:
    """The stable order of the parent's entries by exponent field (recomputed on decode)."""
    mask = (1 << dt.exponent_bits) - 1
    exponent = ((parent.reshape(-1) >> dt.mantissa_bits) & mask).astype(np.uint8)
    return np.argsort(exponent, kind="stable")


def _step_words(child: Words, parent: Words, dt: DType) -> Words:
    with np.errstate(over="ignore"):
        diff = _ordered(child.reshape(-1), dt) - _ordered(parent.reshape(-1), dt)
    return _zigzag(cast(Words, diff.astype(dt.word, copy=False)), dt)[_parent_order(parent, dt)]


def _unstep_words(z: Words, parent: Words, dt: DType) -> Words:
    unsorted = np.empty_like(z)
    unsorted[_parent_order(parent, dt)] = z
    diff = _unzigzag(unsorted, dt)
    with np.errstate(over="ignore"):
        ordered = _ordered(parent.reshape(-1), dt) + diff
    return _unordered(cast(Words, ordered.astype(dt.word, copy=False)), dt)


def _zstd() -> Any:
    from tpm_faas._extras import require

    return require("zstandard", "versions")


def _compress(data: bytes, level: int) -> bytes:
    zstd = _zstd()
    return cast(bytes, zstd.ZstdCompressor(level=level, write_content_size=True).compress(data))


def _decompress(payload: bytes, expected: int, name: str) -> bytes:
    zstd = _zstd()
    try:
        declared = zstd.frame_content_size(payload)
    except zstd.ZstdError as e:
        raise VersionError(f"tensor {name!r}: corrupted payload ({e})") from e
    if declared != expected:
        raise VersionError(
            f"tensor {name!r}: the payload holds {declared} bytes; "
            f"its dtype and shape need {expected}"
        )
    try:
        data = zstd.ZstdDecompressor().decompress(payload, max_output_size=expected)
    except zstd.ZstdError as e:
        raise VersionError(f"tensor {name!r}: corrupted payload ({e})") from e
    if len(data) != expected:
        raise VersionError(
            f"tensor {name!r}: the payload decodes to {len(data)} bytes; expected {expected}"
        )
    return cast(bytes, data)


def _applicable(child: Words, parent: npt.NDArray[Any] | None, dt: DType) -> Words | None:
    """The parent's words if a delta against it is possible (same word size and shape)."""
    if parent is None:
        return None
    p = np.asarray(parent)
    if p.dtype.itemsize != dt.itemsize or p.shape != child.shape:
        return None
    return _words(p, dt, "parent")


def encode(
    child: npt.NDArray[Any],
    parent: npt.NDArray[Any] | None,
    dtype: str,
    *,
    encoding: Encoding | Literal["best"] = "best",
    level: int = DEFAULT_LEVEL,
    name: str = "",
) -> Encoded:
    """Encode ``child`` (raw words of ``dtype``), as a delta against ``parent`` where useful.

    :param child: the tensor's words (any array whose items are the dtype's word size)
    :param parent: the parent version's words of the same tensor, or None
    :param dtype: one of :data:`DTYPES`
    :param encoding: one of :data:`ENCODINGS`, or ``"best"`` for the smallest applicable one
    :param level: the zstd level
    :param name: the tensor's name (kept in the record, used in errors)
    :raises VersionError: an unknown dtype or encoding, words of the wrong size, or a delta
        encoding asked for without a parent of the same dtype and shape
    """
    dt = _dtype(dtype)
    words = _words(child, dt, f"tensor {name!r}")
    pwords = _applicable(words, parent, dt)
    sha = _sha256(words)
    parent_sha = None if pwords is None else _sha256(pwords)
    if encoding == "best":
        candidates: tuple[Encoding, ...] = tuple(
            e for e in ENCODINGS if e not in DELTA_ENCODINGS or pwords is not None
        )
    elif encoding in ENCODINGS:
        if encoding in DELTA_ENCODINGS and pwords is None:
            raise VersionError(
                f"tensor {name!r}: {encoding} needs a parent of the same dtype and shape"
            )
        candidates = (encoding,)
    else:
        raise VersionError(f"unknown encoding {encoding!r}; choose from {', '.join(ENCODINGS)}")
    best: Encoded | None = None
    for enc in candidates:
        payload = _payload(enc, words, pwords, dt, level)
        if best is None or len(payload) < best.nbytes:
            best = Encoded(
                encoding=enc,
                dtype=dt.name,
                shape=tuple(int(s) for s in words.shape),
                sha256=sha,
                nbytes=len(payload),
                level=0 if enc == "raw" else level,
                parent_sha256=parent_sha if enc in DELTA_ENCODINGS else None,
                name=name,
                payload=payload,
            )
    assert best is not None
    return best


def best(
    child: npt.NDArray[Any],
    parent: npt.NDArray[Any] | None,
    dtype: str,
    *,
    level: int = DEFAULT_LEVEL,
    name: str = "",
) -> Encoded:
    """The smallest of every applicable encoding (:func:`encode` with ``encoding="best"``)."""
    return encode(child, parent, dtype, encoding="best", level=level, name=name)


def _payload(enc: Encoding, words: Words, pwords: Words | None, dt: DType, level: int) -> bytes:
    if enc == "raw":
        return _group(words)
    if enc == "zstd":
        return _compress(_group(words), level)
    assert pwords is not None
    if enc == "xor":
        return _compress(_group(words.reshape(-1) ^ pwords.reshape(-1)), level)
    return _compress(_group(_step_words(words, pwords, dt)), level)


def decode(enc: Encoded, parent: npt.NDArray[Any] | None = None) -> Words:
    """The exact words ``enc`` was made from, shaped as declared.

    :param enc: the record with its payload
    :param parent: the parent's words, for the delta encodings
    :returns: a new array of the dtype's word type
    :raises VersionError: the payload's size disagrees with the declared dtype and shape
        (checked before allocating), the payload is corrupted, the parent is missing or not
        the one it was encoded against, or the decoded words' sha256 differs
    """
    name = enc.name
    dt = _dtype(enc.dtype)
    if enc.encoding not in ENCODINGS:
        raise VersionError(f"tensor {name!r}: unknown encoding {enc.encoding!r}")
    if any(int(s) < 0 for s in enc.shape):
        raise VersionError(f"tensor {name!r}: negative dimension in shape {list(enc.shape)}")
    count = math.prod(int(s) for s in enc.shape)
    expected = count * dt.itemsize
    if len(enc.payload) != enc.nbytes:
        raise VersionError(
            f"tensor {name!r}: the payload is {len(enc.payload)} bytes; "
            f"the record says {enc.nbytes}"
        )
    pwords: Words | None = None
    if enc.encoding in DELTA_ENCODINGS:
        if parent is None:
            raise VersionError(f"tensor {name!r}: {enc.encoding} needs its parent to decode")
        pwords = _words(parent, dt, f"parent of tensor {name!r}")
        if pwords.size != count:
            raise VersionError(
                f"tensor {name!r}: the parent has {pwords.size} entries; "
                f"the declared shape {list(enc.shape)} has {count}"
            )
        if enc.parent_sha256 is not None and _sha256(pwords) != enc.parent_sha256:
            raise VersionError(
                f"tensor {name!r}: sha256 mismatch of the parent: it is not the version "
                "this delta was encoded against"
            )
    if enc.encoding == "raw":
        if len(enc.payload) != expected:
            raise VersionError(
                f"tensor {name!r}: the payload holds {len(enc.payload)} bytes; "
                f"its dtype and shape need {expected}"
            )
        data = enc.payload
    else:
        data = _decompress(enc.payload, expected, name)
    z = _ungroup(data, dt)
    if enc.encoding in ("raw", "zstd"):
        words = z
    elif enc.encoding == "xor":
        assert pwords is not None
        words = z ^ pwords.reshape(-1)
    else:
        assert pwords is not None
        words = _unstep_words(z, pwords, dt)
    if _sha256(words) != enc.sha256:
        raise VersionError(
            f"tensor {name!r}: sha256 mismatch of the decoded words "
            f"(expected {enc.sha256[:12]}…, got {_sha256(words)[:12]}…)"
        )
    return words.reshape(enc.shape)
