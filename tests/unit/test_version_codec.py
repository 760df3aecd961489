"""The version store's tensor codec: bit-exact round trips, deltas that pay, corruption refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tpm_faas.errors import ConfigError, VersionError
from tpm_faas.versions.codec import DTYPES, ENCODINGS, Encoded, Encoding, best, decode, encode

WORD = {name: dt.word for name, dt in DTYPES.items()}

#: Bit patterns that must survive: ±0, ±inf, NaNs with payloads, subnormals, extremes.
SPECIALS: dict[str, list[int]] = {
    "bfloat16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFC1, 0x0001, 0x807F, 0x7F7F],
    "float16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE3F, 0x0001, 0x83FF, 0x7BFF],
    "float32": [
        0x00000000,
        0x80000000,
        0x7F800000,
        0xFF800000,
        0x7FC00000,
        0x7F800001,
        0xFFC12345,
        0x00000001,
        0x807FFFFF,
        0x7F7FFFFF,
    ],
    "float8_e4m3fn": [0x00, 0x80, 0x7F, 0xFF, 0x01, 0x87, 0x7E, 0xFE, 0x08, 0x40],
}


def _random_words(dtype: str, n: int, seed: int) -> npt.NDArray[Any]:
    rng = np.random.default_rng(seed)
    word = WORD[dtype]
    return rng.integers(0, np.iinfo(word).max, size=n, endpoint=True, dtype=word)


def _with_specials(dtype: str, n: int, seed: int) -> npt.NDArray[Any]:
    words = _random_words(dtype, n, seed)
    specials = np.array(SPECIALS[dtype], dtype=WORD[dtype])
    k = min(n, specials.size)
    words[:k] = specials[:k]
    return words


def _bf16(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """float32 values to bfloat16 words, rounded to nearest even (finite values only)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _lineage(n: int = 1 << 16) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16]]:
    """A bf16 weight tensor and a small update of it (as a few optimizer steps would make)."""
    rng = np.random.default_rng(15)
    w = rng.normal(0.0, 0.02, n).astype(np.float32)
    parent = _bf16(w)
    parent_values = (parent.astype(np.uint32) << 16).view(np.float32)
    child = _bf16(parent_values + rng.normal(0.0, 2e-4, n).astype(np.float32))
    return parent, child


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_round_trip_is_bit_exact(dtype: str, encoding: Encoding, n: int) -> None:
    parent = _with_specials(dtype, n, seed=1)
    child = _with_specials(dtype, n, seed=2)[::-1].copy()  # specials meet other patterns
    enc = encode(child, parent, dtype, encoding=encoding, name="w")
    assert enc.encoding == encoding and enc.nbytes == len(enc.payload)
    out = decode(Encoded.from_json(enc.to_json(), enc.payload), parent)
    assert out.dtype == WORD[dtype] and out.shape == child.shape
    assert np.array_equal(out, child)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_pattern_round_trips_through_step(dtype: str) -> None:
    """Against every parent pattern, every child pattern (or a wide sample for float32)."""
    word = WORD[dtype]
    if word.itemsize <= 1:
        grid = np.arange(256, dtype=word)
        parent, child = np.repeat(grid, 256), np.tile(grid, 256)
    else:
        parent = _with_specials(dtype, 1 << 15, seed=3)
        child = np.concatenate([parent[1:], parent[:1]])
    for enc_name in ("step", "xor"):
        enc = encode(child, parent, dtype, encoding=enc_name)
        assert np.array_equal(decode(enc, parent), child)


def test_shapes_are_kept() -> None:
    parent = _random_words("float32", 24, seed=4).reshape(2, 3, 4)
    child = parent ^ np.uint32(1)
    enc = best(child, parent, "float32", name="layers.0.w")
    assert enc.shape == (2, 3, 4)
    assert np.array_equal(decode(enc, parent), child)
    scalar = np.array(0x3F80, dtype=np.uint16).reshape(())
    enc = best(scalar, None, "bfloat16")
    assert decode(enc).shape == () and decode(enc) == scalar


def test_float_arrays_of_the_word_size_are_taken_as_words() -> None:
    values = np.array([1.5, -0.0, np.inf, np.nan], dtype=np.float32)
    enc = best(values, None, "float32")
    assert np.array_equal(decode(enc), values.view(np.uint32))


def test_deltas_pay_on_a_small_update_and_best_is_the_smallest() -> None:
    parent, child = _lineage()
    sizes = {e: encode(child, parent, "bfloat16", encoding=e).nbytes for e in ENCODINGS}
    assert sizes["raw"] == child.nbytes
    assert sizes["step"] < sizes["zstd"] and sizes["xor"] < sizes["zstd"]
    assert sizes["step"] < sizes["xor"]  # the point of the step distance
    chosen = best(child, parent, "bfloat16")
    assert chosen.nbytes == min(sizes.values()) and chosen.encoding == "step"
    assert np.array_equal(decode(chosen, parent), child)


def test_an_unchanged_tensor_costs_almost_nothing() -> None:
    parent, _ = _lineage()
    enc = best(parent, parent, "bfloat16")
    assert enc.encoding in ("xor", "step") and enc.nbytes < 100
    assert np.array_equal(decode(enc, parent), parent)


def test_without_a_matching_parent_only_plain_encodings_apply() -> None:
    parent, child = _lineage(1024)
    assert best(child, None, "bfloat16").encoding in ("raw", "zstd")
    assert best(child, parent[:-1], "bfloat16").parent_sha256 is None
    with pytest.raises(VersionError, match="needs a parent"):
        encode(child, None, "bfloat16", encoding="step", name="w")
    with pytest.raises(VersionError, match="needs its parent"):
        decode(encode(child, parent, "bfloat16", encoding="xor", name="w"))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_flipped_payload_byte_is_refused_naming_the_tensor(encoding: Encoding) -> None:
    parent, child = _lineage(4096)
    enc = encode(child, parent, "bfloat16", encoding=encoding, name="model.layers.3.mlp")
    for at in (len(enc.payload) // 2, len(enc.payload) - 1):
        bad = bytearray(enc.payload)
        bad[at] ^= 0x10
        with pytest.raises(VersionError, match=r"model\.layers\.3\.mlp") as info:
            decode(Encoded.from_json(enc.to_json(), bytes(bad)), parent)
        assert isinstance(info.value, ConfigError) and info.value.code == "version_error"


@pytest.mark.parametrize("encoding", ["xor", "step"])
def test_a_wrong_parent_is_refused_naming_the_tensor(encoding: Encoding) -> None:
    parent, child = _lineage(4096)
    enc = encode(child, parent, "bfloat16", encoding=encoding, name="lm_head")
    other = parent.copy()
    other[7] ^= 1
    with pytest.raises(VersionError, match=r"'lm_head'.*sha256 mismatch"):
        decode(enc, other)
    # Without the recorded parent hash, the decoded words' hash still catches it.
    record = enc.to_json() | {"parent_sha256": None}
    with pytest.raises(VersionError, match=r"'lm_head'.*sha256 mismatch of the decoded"):
        decode(Encoded.from_json(record, enc.payload), other)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_declared_shape_that_does_not_fit_is_refused_before_allocating(
    encoding: Encoding,
) -> None:
    parent, child = _lineage(4096)
    enc = encode(child, parent, "bfloat16", encoding=encoding, name="embed")
    huge = enc.to_json() | {"shape": [1 << 40, 1 << 20]}
    with pytest.raises(VersionError, match="'embed'"):
        decode(Encoded.from_json(huge, enc.payload), parent)
    small = enc.to_json() | {"shape": [4095]}
    with pytest.raises(VersionError, match="'embed'"):
        decode(Encoded.from_json(small, enc.payload), parent[:-1])
    wrong_dtype = enc.to_json() | {"dtype": "float32"}
    with pytest.raises(VersionError, match="'embed'"):
        decode(Encoded.from_json(wrong_dtype, enc.payload), parent.view(np.uint32))


def test_malformed_records_and_inputs_are_refused() -> None:
    enc = best(_random_words("float16", 8, seed=5), None, "float16", name="b")
    with pytest.raises(VersionError, match="unknown encoding"):
        Encoded.from_json(enc.to_json() | {"encoding": "gzip"}, enc.payload)
    with pytest.raises(VersionError, match="unknown dtype"):
        Encoded.from_json(enc.to_json() | {"dtype": "int4"}, enc.payload)
    with pytest.raises(VersionError, match="malformed"):
        Encoded.from_json({"name": "b"}, enc.payload)
    with pytest.raises(VersionError, match="record says"):
        decode(Encoded.from_json(enc.to_json(), enc.payload + b"\0"))
    with pytest.raises(VersionError, match="unsupported dtype"):
        encode(np.zeros(4, np.uint16), None, "int16")
    with pytest.raises(VersionError, match="bfloat16 words are 2"):
        encode(np.zeros(4, np.uint32), None, "bfloat16")


def test_record_json_round_trip() -> None:
    parent, child = _lineage(256)
    enc = encode(child, parent, "bfloat16", encoding="step", level=5, name="w")
    record = enc.to_json()
    assert "payload" not in record and record["level"] == 5 and record["shape"] == [256]
    assert Encoded.from_json(record, enc.payload) == enc


def test_without_zstandard_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from tpm_faas.errors import MissingExtra

    monkeypatch.setitem(__import__("sys").modules, "zstandard", None)
    words = _random_words("bfloat16", 16, seed=6)
    assert np.array_equal(decode(encode(words, None, "bfloat16", encoding="raw")), words)
    with pytest.raises(MissingExtra, match=r"tpm-faas\[versions\]"):
        encode(words, None, "bfloat16", encoding="zstd")
