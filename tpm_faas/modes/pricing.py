"""Worst-case sizes of results, derived from the JSON the shard group and the gateway produce.

The gateway counts ``bytes_returned`` (:meth:`tpm_faas.gateway.pipeline.Gateway._bytes_out`) as
the compact JSON text of a result's ``output`` (``json.dumps(..., separators=(",", ":"))``,
ASCII-escaped), less the base64 text of its inline tensors, plus their raw bytes; when the
tensors go by reference (:func:`tpm_faas.gateway.results.offload`) each payload's ``data`` is
replaced by its ``key``, the output gains a ``tensors_ref`` record, and the results file
(a safetensors file: an 8-byte length, a JSON header, the raw data) counts whole.

Every function here returns an upper bound of one part of that count, item by item, from what
admission knows (prompt tokens, positions, shapes, ``max_new_tokens``); the mode modules add
them up so that ``Admission.worst.bytes_returned`` is a true upper bound of what the gateway
counts, with no margin beyond what each item's worst case needs. The literal key texts are
written out in the comments and checked in ``tests/unit/test_pricing.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from tpm_faas.tokenizer import Tokenizer

#: Bytes per saved value (saved tensors and head outputs come back as float32).
BYTES_PER_VALUE = 4
#: A Python float in JSON (``repr``): at most a sign, 17 significant digits, a point and a
#: 3-digit exponent (``-1.2345678901234567e-308``); ``-Infinity`` and ``NaN`` are shorter.
FLOAT_JSON = 24
#: ``round(p, 6)`` of a probability in [0, 1]: ``0.123456`` (``repr`` is the shortest text
#: that reads back, and a 6-decimal number is read back from its 6 decimals).
PROB_JSON = 8
#: ``round(s, 6)`` of a duration under 1e9 s: at most 9 + 1 + 6 characters
#: (``999999999.999999``; under 1e-4 s ``repr`` switches to ``1.5e-05``, shorter).
SECONDS_JSON = 16
#: Characters of a request id the gateway makes up when the request names none (a Globus
#: Compute task id or a uuid4 are 36; priced at the longest id a request may name).
MAX_REQUEST_ID = 128
#: Site-dependent parts of a by-reference result, bounded here because admission runs before
#: the caller and the site are known to the mode: the owner recorded in the results file's
#: header (the caller's identity as JSON text; a Globus identity id is 36 characters) and
#: ``file://`` plus the results directory in the ``tensors_ref`` URI. The gateway enforces
#: both (``tpm_faas.gateway.pipeline``: an identity longer is refused, a results directory
#: longer is a configuration error), so the estimate is a true bound.
MAX_OWNER_JSON = 256
MAX_RESULTS_DIR_URI = 1024


def digits(n: int) -> int:
    """Characters of integer ``n`` in JSON."""
    return len(str(n))


def ints_json(values: Iterable[int]) -> int:
    """Characters between the brackets of a JSON list of ``values`` (digits and commas)."""
    vals = list(values)
    return sum(len(str(v)) for v in vals) + max(len(vals) - 1, 0)


def list_json(items: Sequence[int]) -> int:
    """Characters of a JSON list whose items are ``items`` characters long (brackets, commas)."""
    return 2 + sum(items) + max(len(items) - 1, 0)


def token_json(tok: Tokenizer, vocab_size: int) -> int:
    """The longest JSON string (with quotes) of ``tok.token_str`` over ids below
    ``vocab_size`` (ids the tokenizer does not know print as ``<id>``)."""
    return max(tok.token_str_json_max, len(json.dumps(f"<{max(vocab_size - 1, 0)}>")))


def token_str_json(tok: Tokenizer, token_id: int) -> int:
    """The JSON string (with quotes) of one known token, as the logit lens writes it."""
    return len(json.dumps(tok.token_str(token_id)))


def completion(
    prompt_tokens: int,
    max_new: int,
    vocab_size: int,
    tok: Tokenizer,
    *,
    logprobs: bool = False,
    extra: int = 0,
) -> int:
    """One completion of :meth:`tpm_faas.runtime.scheduler.Scheduler._result`, at most
    ``max_new`` generated tokens (every item below grows with the count), with ``extra``
    characters of members after ``finish_reason`` (intervene's ``saved`` and
    ``logit_lens``)::

        {"text":"…","token_ids":[…],"prompt_tokens":N,"completion_tokens":K,"seconds":S,
         "finish_reason":"length","logprobs":[{"token":"…","id":I,"logprob":L},…]}

    The text is bounded per token by the tokenizer (``tok.text_json_per_token``: a stop
    string only shortens it)."""
    k, id_json = max_new, digits(max(vocab_size - 1, 0))
    n = 10 + tok.text_json_per_token * k  # {"text":"…"
    n += 14 + ints_json([vocab_size - 1] * k) + 1  # ,"token_ids":[…]
    n += 17 + digits(prompt_tokens)  # ,"prompt_tokens":N
    n += 21 + digits(k)  # ,"completion_tokens":K
    n += 11 + SECONDS_JSON  # ,"seconds":S
    n += 17 + 8  # ,"finish_reason":"length"
    if logprobs:
        # {"token":T,"id":I,"logprob":L}
        entry = 9 + token_json(tok, vocab_size) + 6 + id_json + 11 + FLOAT_JSON + 1
        n += 12 + list_json([entry] * k)  # ,"logprobs":[…]
    return n + extra + 1  # }


def lens_row(
    site: str,
    layer: int,
    position: int,
    input_token: int,
    top_k: int,
    vocab_size: int,
    tok: Tokenizer,
) -> int:
    """One row of :func:`tpm_faas.runtime.interventions.lens_tables`::

    {"site":"…","layer":L,"position":P,"input_token":"…","top":[{"token":"…","id":I,"prob":p},…]}
    """
    top = 9 + token_json(tok, vocab_size) + 6 + digits(max(vocab_size - 1, 0)) + 8 + PROB_JSON + 1
    return (
        9  # {"site":"
        + len(site)
        + 10  # ","layer":
        + digits(layer)
        + 12  # ,"position":
        + digits(position)
        + 15  # ,"input_token":
        + token_str_json(tok, input_token)
        + 7  # ,"top":
        + list_json([top] * top_k)
        + 1  # }
    )


def tensor_payload(shape: Sequence[int]) -> int:
    """An inline float32 payload as the gateway counts it (the base64 text less itself, plus
    the raw bytes): ``{"dtype":"float32","shape":[…],"data":""}`` and ``4 * prod(shape)``."""
    raw = BYTES_PER_VALUE
    for d in shape:
        raw *= d
    return 40 + ints_json(shape) + raw


def by_reference_extra(path: str, shape: Sequence[int], file_data: int) -> int:
    """What one payload adds when it goes by reference, beyond :func:`tensor_payload`: in the
    output ``"key":"<path>"`` instead of ``"data":""``, in the results file's header
    ``,"<path>":{"dtype":"F32","shape":[…],"data_offsets":[s,e]}`` (offsets at most
    ``file_data``, the file's data bytes); its raw bytes move from the output to the file."""
    key = 8 + len(path) - 9
    entry = 2 + len(path) + 26 + ints_json(shape) + 18 + 2 * digits(file_data) + 1 + 2
    return key + entry


def by_reference_envelope(request_id: str | None, file_bound: int) -> int:
    """The per-result part of a by-reference result: the results file's length prefix, its
    header's ``{"__metadata__":{"request_id":"…","owner":"…"}`` and closing ``}``, up to 7
    bytes of padding to 8, and the output's
    ``,"tensors_ref":{"name":"…","uri":"…","sha256":"…","bytes":N,"format":"safetensors"}``
    (the file name is the request id's characters plus ``.safetensors``; the URI is the
    results directory's plus ``/`` and the file name). ``file_bound`` bounds the file's size."""
    rid = len(request_id) if request_id is not None else MAX_REQUEST_ID
    header = 8 + 31 + rid + 11 + MAX_OWNER_JSON + 2 + 1 + 7
    name = rid + 12
    uri = MAX_RESULTS_DIR_URI + 1 + name
    ref = 24 + name + 9 + uri + 12 + 64 + 10 + digits(file_bound + header) + 24
    return header + ref
