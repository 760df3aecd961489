"""Iteration-level batching on the real demo model (in process): batched equals alone.

The decoder and scheduler run exactly as in rank 0 of a shard group, minus the socket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tpm_faas.config import BUNDLED_MODELS
from tpm_faas.runtime.decoder import Decoder
from tpm_faas.runtime.scheduler import Scheduler
from tpm_faas.tokenizer import ByteTokenizer

pytestmark = pytest.mark.integration

PROMPTS = [
    "And God said, Let there be",
    "In the beginning",
    "And Abraham",
    "And it came to pass after these things, that God did tempt",
    "Now the serpent",
    "And Jacob",
    "And the LORD said unto Moses",
    "These are the generations",
]


@pytest.fixture(scope="module")
def model() -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        BUNDLED_MODELS / "demo-tpm" / "1", dtype=torch.float32
    ).eval()


TOK = ByteTokenizer()


def make_scheduler(model: Any, slots: int = 8, max_len: int = 512) -> Scheduler:
    return make_scheduler_on(Decoder(model, slots=slots, max_len=max_len))


def body(prompt: str, n: int = 24, **kw: Any) -> dict[str, Any]:
    return {"prompt_ids": [TOK.encode(prompt)], "max_new_tokens": n, "logprobs": True, **kw}


def drain(s: Scheduler, replies: dict[Any, dict[str, Any]], steps: int | None = None) -> None:
    done = 0
    while s.busy and (steps is None or done < steps):
        replies.update(s.step())
        done += 1


def alone(model: Any, b: dict[str, Any]) -> dict[str, Any]:
    s = make_scheduler(model)
    s.submit("k", "r", b)
    out: dict[Any, dict[str, Any]] = {}
    drain(s, out)
    return out["k"]


def ids_of(reply: dict[str, Any]) -> list[list[int]]:
    return [c["token_ids"] for c in reply["result"]["completions"]]


def test_decoder_matches_transformers_forward(model: Any) -> None:
    tok = ByteTokenizer()
    dec = Decoder(model, slots=2, max_len=128)
    ids = tok.encode(PROMPTS[0])
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0]
        got = dec.prefill(1, ids[:-1])
        torch.testing.assert_close(got[0], ref[-2], rtol=1e-4, atol=1e-4)
        # One decode step at the next position gives the forward's last logits.
        step = dec.decode([1], [ids[-1]], [len(ids) - 1])
    torch.testing.assert_close(step[0], ref[-1], rtol=1e-4, atol=1e-4)


def test_batched_greedy_equals_alone(model: Any) -> None:
    want = {p: ids_of(alone(model, body(p))) for p in PROMPTS}
    s = make_scheduler(model)
    for p in PROMPTS:
        s.submit(p, p, body(p))
    got: dict[Any, dict[str, Any]] = {}
    drain(s, got)
    for p in PROMPTS:
        assert ids_of(got[p]) == want[p], p
        assert got[p]["result"]["timing"]["max_batch"] == len(PROMPTS)


def test_requests_join_and_leave_at_step_boundaries(model: Any) -> None:
    s = make_scheduler(model, slots=3)
    got: dict[Any, dict[str, Any]] = {}
    s.submit("short", "a", body(PROMPTS[0], n=4))
    s.submit("long", "b", body(PROMPTS[1], n=30))
    drain(s, got, steps=6)
    assert "short" in got and "long" not in got  # the short one left; the long one runs on
    for p in PROMPTS[2:6]:  # more than the free slots: they queue, then join
        s.submit(p, p, body(p, n=12))
    drain(s, got)
    assert ids_of(got["long"]) == ids_of(alone(model, body(PROMPTS[1], n=30)))
    for p in PROMPTS[2:6]:
        assert ids_of(got[p]) == ids_of(alone(model, body(p, n=12))), p
        assert got[p]["result"]["timing"]["queue_s"] >= 0


def test_sampling_is_per_request_and_seeded(model: Any) -> None:
    sampled = body(PROMPTS[0], n=16, temperature=1.0, top_p=0.9, seed=7)
    s = make_scheduler(model)
    s.submit("greedy", "g", body(PROMPTS[0], n=16))
    s.submit("sampled", "s", sampled)
    got: dict[Any, dict[str, Any]] = {}
    drain(s, got)
    assert ids_of(got["sampled"]) == ids_of(alone(model, sampled))
    assert ids_of(got["greedy"]) == ids_of(alone(model, body(PROMPTS[0], n=16)))
    assert ids_of(got["greedy"]) != ids_of(got["sampled"])


@pytest.mark.parametrize(
    "bad,code",
    [
        ({"top_p": 0.0}, "bad_request"),
        ({"temperature": -1.0}, "bad_request"),
        ({"max_new_tokens": 600}, "limit_exceeded"),
    ],
)
def test_bad_request_fails_alone(model: Any, bad: dict[str, Any], code: str) -> None:
    s = make_scheduler(model)
    s.submit("good", "g", body(PROMPTS[2], n=8))
    s.submit("bad", "b", {**body(PROMPTS[0]), **bad})
    got: dict[Any, dict[str, Any]] = {}
    drain(s, got)
    assert got["bad"]["ok"] is False and got["bad"]["error"]["code"] == code
    assert ids_of(got["good"]) == ids_of(alone(model, body(PROMPTS[2], n=8)))


def test_a_failing_model_call_fails_only_its_request(model: Any) -> None:
    inner = make_scheduler(model)
    calls: list[str] = []

    def flaky(plan: dict[str, Any], run: Callable[[dict[str, Any]], torch.Tensor]) -> torch.Tensor:
        calls.append(plan["op"])
        if plan["op"] == "prefill" and plan["ids"] == ByteTokenizer().encode("boom"):
            raise MemoryError("out of memory while prefilling")
        return run(plan)

    run = inner.run_plan
    inner.run_plan = lambda plan: flaky(plan, run)
    inner.submit("boom", "x", body("boom"))
    inner.submit("fine", "y", body(PROMPTS[0], n=8))
    got: dict[Any, dict[str, Any]] = {}
    drain(inner, got)
    assert got["boom"]["ok"] is False and "out of memory" in got["boom"]["error"]["message"]
    assert ids_of(got["fine"]) == ids_of(alone(model, body(PROMPTS[0], n=8)))
    assert not inner.busy


def test_static_decode_step_equals_dynamic(model: Any) -> None:
    """The graph-capturable step (slots 0..B-1, whole-cache attention) gives the same logits."""
    tok = ByteTokenizer()
    dyn, dense = Decoder(model, slots=4, max_len=96), Decoder(model, slots=4, max_len=96)
    prompts = PROMPTS[:3]  # slots 0..2 run; slot 3 idle in the bucket of 4
    last = []
    for s, p in enumerate(prompts):
        ids = tok.encode(p)
        a, b = dyn.prefill(s, ids), dense.prefill(s, ids)
        torch.testing.assert_close(a, b)
        last.append(int(a[0].argmax()))
    pos = [len(tok.encode(p)) for p in prompts]
    for _ in range(8):
        a = dyn.decode([0, 1, 2], last, pos)
        b = dense.decode_dense(torch.tensor([*last, 0]), torch.tensor([*pos, 0]))[0][:3]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        last = [int(r.argmax()) for r in a]
        pos = [q + 1 for q in pos]


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the CUDA-graph decode step is only captured there")
    from transformers import AutoModelForCausalLM

    m = (
        AutoModelForCausalLM.from_pretrained(BUNDLED_MODELS / "demo-tpm" / "1", dtype=torch.float32)
        .cuda()
        .eval()
    )
    s_graph = make_scheduler_on(Decoder(m, slots=8, max_len=256, cuda_graphs=True))
    s_eager = make_scheduler_on(Decoder(m, slots=8, max_len=256, cuda_graphs=False))
    got: dict[str, dict[Any, dict[str, Any]]] = {"g": {}, "e": {}}
    for key, s in (("g", s_graph), ("e", s_eager)):
        for p in PROMPTS:
            s.submit(p, p, body(p))
        drain(s, got[key])
    for p in PROMPTS:
        assert ids_of(got["g"][p]) == ids_of(got["e"][p]), p


def make_scheduler_on(dec: Decoder) -> Scheduler:
    return Scheduler(dec.run_plan, slots=dec.slots, max_len=dec.max_len)


def test_abort_fails_every_request_and_frees_the_slots(model: Any) -> None:
    s = make_scheduler(model, slots=2)
    for p in PROMPTS[:3]:
        s.submit(p, p, body(p))
    drain(s, {}, steps=2)
    out = dict(s.abort("the shard group is shutting down"))
    assert set(out) == set(PROMPTS[:3]) and not s.busy
    assert all(r["error"]["code"] == "shard_unavailable" for r in out.values())
    again: dict[Any, dict[str, Any]] = {}
    s.submit("next", "n", body(PROMPTS[0], n=8))
    drain(s, again)
    assert ids_of(again["next"]) == ids_of(alone(model, body(PROMPTS[0], n=8)))


def test_a_request_with_more_prompts_than_slots_completes(model: Any) -> None:
    """Each finished prompt frees its slot at once, so 7 prompts run through 2 slots, and
    each equals the prompt alone (finished sequences never hold the others back)."""
    s = make_scheduler(model, slots=2)
    prompts = [*PROMPTS, "And Noah", "Now the serpent", "And Jacob"][:7]
    ids = [TOK.encode(p) for p in prompts]
    s.submit("many", "r", {"prompt_ids": ids, "max_new_tokens": 6, "stop_at_eos": False})
    out: dict[Any, dict[str, Any]] = {}
    drain(s, out, steps=500)
    assert not s.busy and out["many"]["ok"], out
    for p, got in zip(prompts, ids_of(out["many"]), strict=True):
        assert got == ids_of(alone(model, body(p, n=6, stop_at_eos=False)))[0]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection reset by peer"),
            "shard_unavailable",
        ),
        (ConnectionResetError("Connection reset by peer"), "shard_unavailable"),
        (torch.distributed.DistBackendError("NCCL communicator was aborted"), "shard_unavailable"),
        (ValueError("a bug"), "internal"),
    ],
)
def test_a_lost_rank_is_the_groups_failure_not_internal(
    model: Any, error: Exception, code: str
) -> None:
    """A collective that fails because a peer rank died fails the request as
    ``shard_unavailable`` (retry elsewhere), not as an internal error (issue 12, defect 8)."""
    dec = Decoder(model, slots=2, max_len=64)

    def broken(plan: dict[str, Any]) -> Any:
        if plan["op"] == "decode":
            raise error
        return dec.run_plan(plan)

    s = Scheduler(broken, slots=2, max_len=64)
    s.submit("k", "r", body(PROMPTS[0], n=4))
    out: dict[Any, dict[str, Any]] = {}
    drain(s, out)
    assert out["k"]["ok"] is False and out["k"]["error"]["code"] == code
    assert out["k"]["error"]["layer"] == ("shard" if code == "shard_unavailable" else "internal")
