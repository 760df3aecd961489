"""Reading a saved intervene reply: every prompt's logit-lens rows, and a replay compared with
its original bit for bit (no model needed)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tpm_faas.client import Result, parse_reply
from tpm_faas.protocol.codec import encode_array
from tpm_faas.replay import compare

RECEIPT = {
    "request_id": "r",
    "model": "m@1",
    "checkpoint_sha256": "0" * 64,
    "request_sha256": "1" * 64,
    "dtype": "float32",
    "tp_size": 1,
    "policy_sha256": "2" * 64,
    "versions": {},
    "issued_at": 0.0,
}


def _intervene_reply(runs: list[dict[str, Any]]) -> Result:
    """A saved intervene reply whose prompts ran as ``runs``."""
    run = {"text": "", "token_ids": [], "prompt_tokens": 3, "completion_tokens": 0}
    reply = {
        "ok": True,
        "request_id": "r",
        "mode": "intervene",
        "model": "m@1",
        "output": {"results": [{**run, **r} for r in runs]},
        "usage": {},
        "receipt": RECEIPT,
    }
    return parse_reply(json.dumps(reply))


def test_every_prompt_has_its_logit_lens_rows() -> None:
    def rows(prompt: int) -> list[dict[str, Any]]:
        return [
            {"layer": layer, "position": 2, "top": [{"id": prompt, "logprob": -0.5 * layer}]}
            for layer in range(3)
        ]

    r = _intervene_reply([{"logit_lens": rows(0)}, {"logit_lens": rows(1)}])
    assert r.logit_lens == r.logit_lens_for(0)
    second = r.logit_lens_for(1)
    assert [row["layer"] for row in second] == [0, 1, 2]
    assert all(row["top"][0]["id"] == 1 for row in second)


def test_compare_names_the_site_and_token_of_a_saved_difference() -> None:
    """Two results that differ in one saved row: the site, the row's token position and the
    largest difference are reported."""

    def saved(value: float) -> Result:
        a = np.zeros((3, 4), dtype=np.float32)
        a[2, 1] = value
        site = {"tensor": encode_array(a), "positions": [0, 1, 4]}
        run = {"token_ids": [5, 6], "completion_tokens": 2}
        return _intervene_reply([{**run, "saved": {"blocks.0.hook_resid_post": site}}])

    same = compare(saved(1.0), saved(1.0))
    assert same.identical and same.summary().startswith("identical")
    [d] = compare(saved(1.0), saved(1.5)).differences
    assert (d.what, d.site, d.token_index, d.max_abs_diff) == (
        "saved",
        "blocks.0.hook_resid_post",
        4,
        0.5,
    )
    nz = compare(saved(0.0), saved(-0.0))
    assert not nz.identical and nz.differences[0].max_abs_diff == 0.0  # bits, not values
