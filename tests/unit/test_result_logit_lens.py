"""``Result.logit_lens_for(i)``: every prompt's logit-lens rows, not only the first's."""

from __future__ import annotations

import json

from tpm_faas.client import parse_reply


def _reply() -> str:
    def run(prompt: int) -> dict[str, object]:
        rows = [
            {"layer": layer, "position": 2, "top": [{"id": prompt, "logprob": -0.5 * layer}]}
            for layer in range(3)
        ]
        return {
            "text": "",
            "token_ids": [],
            "prompt_tokens": 3,
            "completion_tokens": 0,
            "logit_lens": rows,
        }

    receipt = {
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
    return json.dumps(
        {
            "ok": True,
            "request_id": "r",
            "mode": "intervene",
            "model": "m@1",
            "output": {"results": [run(0), run(1)]},
            "usage": {},
            "receipt": receipt,
        }
    )


def test_every_prompt_has_its_rows() -> None:
    r = parse_reply(_reply())
    assert r.logit_lens == r.logit_lens_for(0)
    second = r.logit_lens_for(1)
    assert [row["layer"] for row in second] == [0, 1, 2]
    assert all(row["top"][0]["id"] == 1 for row in second)
