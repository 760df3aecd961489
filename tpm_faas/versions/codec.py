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
    order costs nothing to store); then grouped and zstd'd, each run of one parent exponent
    in each plane starting a zstd block of its own, so that each block's entropy tables fit
    that run alone (a plain zstd frame still: the block boundaries change only its size).

:func:`best` tries every applicable encoding (the delta ones only with a parent of the same
dtype and shape) and keeps the smallest. The :class:`Encoded` record (``to_json`` for the
manifest; the payload bytes travel separately) names the encoding, dtype, shape and the sha256
of the decoded words; :func:`decode` checks sizes before allocating and the hash after, and
raises :class:`~tpm_faas.errors.VersionError` naming the tensor when anything disagrees.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
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
    n = flat.size
    planes = np.empty(size * n, dtype=np.uint8)
    bytes_ = flat.view(np.uint8).reshape(-1, size)
    for i in range(size):  # one strided copy per plane (a transposing copy is slower)
        planes[i * n : (i + 1) * n] = bytes_[:, size - 1 - i]
    return planes.tobytes()


def _ungroup(data: bytes, dt: DType) -> Words:
    size = dt.itemsize
    planes = np.frombuffer(data, dtype=np.uint8)
    if size == 1:
        return cast(Words, planes.copy().view(dt.word))
    n = planes.size // size
    out = np.empty(n, dtype=dt.word)
    bytes_ = out.view(np.uint8).reshape(-1, size)
    for i in range(size):
        bytes_[:, size - 1 - i] = planes[i * n : (i + 1) * n]
    return cast(Words, out)


def _ordered(words: Words, dt: DType) -> Words:
    """Bit patterns mapped to integers in the floats' order (positive: set the sign bit;
    negative: invert all bits), so the difference counts representable steps."""
    # Both cases are one XOR: with the sign bit s, by (s ? all ones : the sign bit).
    mask = (words >> dt.word.type(dt.bits - 1)) * dt.word.type((1 << (dt.bits - 1)) - 1)
    mask |= dt.word.type(1 << (dt.bits - 1))
    mask ^= words
    return cast(Words, mask)


def _unordered(ordered: Words, dt: DType) -> Words:
    # The inverse: the sign bit set (a positive float) flips it alone, else every bit flips.
    top = dt.word.type(1)
    mask = ((ordered >> dt.word.type(dt.bits - 1)) ^ top) * dt.word.type((1 << (dt.bits - 1)) - 1)
    mask |= dt.word.type(1 << (dt.bits - 1))
    mask ^= ordered
    return cast(Words, mask)


def _signed(dt: DType) -> np.dtype[Any]:
    return np.dtype(f"<i{dt.itemsize}")


def _zigzag(diff: Words, dt: DType) -> Words:
    s = diff.view(_signed(dt))
    return cast(Words, ((s << 1) ^ (s >> (dt.bits - 1))).view(dt.word))


def _unzigzag(z: Words, dt: DType) -> Words:
    one = dt.word.type(1)
    return cast(Words, (z >> one) ^ (dt.word.type(0) - (z & one)))


#: Entries per block of :func:`_by_exponent`: a block's stable argsort stays in the caches.
_BLOCK: Final = 1 << 17


def _exponents(parent: Words, dt: DType) -> npt.NDArray[np.uint8]:
    """The parent's exponent fields, the key of the step encoding's order."""
    mask = dt.word.type((1 << dt.exponent_bits) - 1)
    return cast(
        npt.NDArray[np.uint8], ((parent.reshape(-1) >> dt.mantissa_bits) & mask).astype(np.uint8)
    )


def _segments(keys: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per block of :data:`_BLOCK` keys, how many of each key it holds, and where the entries
    of that block and key start in the stable order by key (key-major, then block order)."""
    nb = max(1, -(-keys.size // _BLOCK))
    counts = np.empty((nb, 256), dtype=np.int64)
    for b in range(nb):
        counts[b] = np.bincount(keys[b * _BLOCK : (b + 1) * _BLOCK], minlength=256)
    flat = counts.T.reshape(-1)
    starts = (np.cumsum(flat) - flat).reshape(256, nb)
    return counts, starts


def _by_exponent(
    z: Words,
    keys: npt.NDArray[np.uint8],
    segments: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None,
) -> Words:
    """``z`` in the stable order of ``keys`` (``z[np.argsort(keys, kind="stable")]``), built
    a block at a time: each block's entries sorted locally, then its run of each key copied
    to where that key's entries of that block go. ``segments``: :func:`_segments` of
    ``keys`` when already made."""
    counts, starts = _segments(keys) if segments is None else segments
    out = np.empty_like(z)
    for b in range(counts.shape[0]):
        lo, hi = b * _BLOCK, (b + 1) * _BLOCK
        block = z[lo:hi][np.argsort(keys[lo:hi], kind="stable")]
        at = 0
        for k in np.flatnonzero(counts[b]).tolist():
            n, start = int(counts[b, k]), int(starts[k, b])
            out[start : start + n] = block[at : at + n]
            at += n
    return out


def _from_exponent(zs: Words, keys: npt.NDArray[np.uint8]) -> Words:
    """The inverse of :func:`_by_exponent`."""
    counts, starts = _segments(keys)
    out = np.empty_like(zs)
    for b in range(counts.shape[0]):
        lo, hi = b * _BLOCK, (b + 1) * _BLOCK
        runs = [
            zs[int(starts[k, b]) : int(starts[k, b]) + int(counts[b, k])]
            for k in np.flatnonzero(counts[b]).tolist()
        ]
        out[lo:hi][np.argsort(keys[lo:hi], kind="stable")] = (
            np.concatenate(runs) if runs else zs[:0]
        )
    return out


def _step_words(child: Words, parent: Words, dt: DType) -> tuple[Words, list[int]]:
    """The step encoding's words before grouping, and where each run of one parent exponent
    ends in them."""
    with np.errstate(over="ignore"):
        diff = _ordered(child.reshape(-1), dt) - _ordered(parent.reshape(-1), dt)
    keys = _exponents(parent, dt)
    segments = _segments(keys)
    ends = np.cumsum(segments[0].sum(axis=0))
    return _by_exponent(_zigzag(diff, dt), keys, segments), sorted(set(ends.tolist()))


def _unstep_words(z: Words, parent: Words, dt: DType) -> Words:
    diff = _unzigzag(_from_exponent(z, _exponents(parent, dt)), dt)
    with np.errstate(over="ignore"):
        ordered = _ordered(parent.reshape(-1), dt)
        ordered += diff
    return _unordered(ordered, dt)


def _zstd() -> Any:
    from tpm_faas._extras import require

    return require("zstandard", "versions")


#: Each thread's zstd compressors (by level) and decompressor, made once and reused (a
#: zstandard context is not thread-safe, and making one per tensor costs its allocations).
_contexts = threading.local()


#: The step encoding's zstd blocks hold at least this many entries of each plane...
_MIN_RUN: Final = 1024
#: ...and a tensor with fewer entries is one run (blocks of its own cost more than they save).
_MIN_CUT_COUNT: Final = 1 << 15


def _block_cuts(ends: list[int], count: int, planes: int) -> list[int]:
    """Where the step encoding's grouped bytes start a new zstd block: at the end of each run
    of one parent exponent in each plane (runs shorter than :data:`_MIN_RUN` merged with the
    next), and at each plane's end."""
    if count < _MIN_CUT_COUNT:
        return []
    kept: list[int] = []
    last = 0
    for end in ends:
        if end - last >= _MIN_RUN and count - end >= _MIN_RUN:
            kept.append(end)
            last = end
    kept.append(count)
    return [i * count + end for i in range(planes) for end in kept][:-1]


def _compress(data: bytes, level: int, cuts: list[int] | None = None) -> bytes:
    """One zstd frame (content size written); with ``cuts``, each of those offsets starts a
    new block, so that each block's entropy tables fit the statistics of its part alone (the
    frame decodes the same way as any other)."""
    zstd = _zstd()
    cache: dict[int, Any] | None = getattr(_contexts, "compressors", None)
    if cache is None:
        cache = _contexts.compressors = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstd.ZstdCompressor(level=level, write_content_size=True)
    if not cuts:
        return cast(bytes, cctx.compress(data))
    cobj = cctx.compressobj(size=len(data))
    view = memoryview(data)
    out = []
    start = 0
    for cut in [*cuts, len(data)]:
        if cut > start:
            out.append(cobj.compress(view[start:cut]))
            out.append(cobj.flush(zstd.COMPRESSOBJ_FLUSH_BLOCK))
            start = cut
    out.append(cobj.flush())
    return b"".join(out)


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
    dctx = getattr(_contexts, "decompressor", None)
    if dctx is None:
        dctx = _contexts.decompressor = zstd.ZstdDecompressor()
    try:
        data = dctx.decompress(payload, max_output_size=expected)
    except zstd.ZstdError as e:
        raise VersionError(f"tensor {name!r}: corrupted payload ({e})") from e
    if len(data) != expected:
        raise VersionError(
            f"tensor {name!r}: the payload decodes to {len(data)} bytes; expected {expected}"
        )
    return cast(bytes, data)


#: Tensors of at least this many bytes have their candidate encodings made side by side.
_PARALLEL_BYTES: Final = 1 << 18
_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _candidates_pool() -> ThreadPoolExecutor:
    """The threads :func:`encode` makes a large tensor's candidates on (zstd, numpy and
    sha256 release the GIL), made on first use in each process (a forked child has none of
    its parent's threads)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            workers = min(3, os.cpu_count() or 1)
            _pool = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="tpm-codec"))
        return _pool[1]


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
    # raw's size is known without making it; the others are made (side by side when large).
    made = [e for e in candidates if e != "raw"]
    if len(made) > 1 and words.nbytes >= _PARALLEL_BYTES:
        jobs = [_candidates_pool().submit(_payload, e, words, pwords, dt, level) for e in made]
        payloads = {e: job.result() for e, job in zip(made, jobs, strict=True)}
    else:
        payloads = {e: _payload(e, words, pwords, dt, level) for e in made}
    chosen: Encoding | None = None
    size = 0
    for enc in candidates:  # the first of the smallest, in the order of ENCODINGS
        n = words.nbytes if enc == "raw" else len(payloads[enc])
        if chosen is None or n < size:
            chosen, size = enc, n
    assert chosen is not None
    payload = _group(words) if chosen == "raw" else payloads[chosen]
    return Encoded(
        encoding=chosen,
        dtype=dt.name,
        shape=tuple(int(s) for s in words.shape),
        sha256=sha,
        nbytes=len(payload),
        level=0 if chosen == "raw" else level,
        parent_sha256=parent_sha if chosen in DELTA_ENCODINGS else None,
        name=name,
        payload=payload,
    )


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
    z, ends = _step_words(words, pwords, dt)
    return _compress(_group(z), level, _block_cuts(ends, z.size, dt.itemsize))


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
