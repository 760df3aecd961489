"""Pricing is a true upper bound: for random valid requests of every mode and op, what the
gateway counts and charges never exceeds what admission held, and no post is capped.

The gateway here is the real one (dev tokens, policy, SQLite ledger, registry, results by
reference) with a shard seam that runs the real runtime in process: the serving
:class:`Decoder` and :class:`Scheduler` (query, intervene) and :class:`ModelRunner.embed`
on the bundled demo model, a random GPT-2 (both byte-level) and a published Qwen3 checkpoint
with its own BPE tokenizer and chat template, so ``bytes_returned`` is counted exactly as a
site counts it (``Gateway._bytes_out``), offload to a results file included.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _models import random_gpt2
from _published import published
from _reference import info_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tpm_faas import catalog
from tpm_faas.config import BUNDLED_MODELS
from tpm_faas.errors import LimitExceeded, TPMError
from tpm_faas.gateway.ledger import to_su
from tpm_faas.modes import MODES
from tpm_faas.modes.intervene import LENS_SITES
from tpm_faas.policy import Caller, Limits, Usage
from tpm_faas.protocol import codec
from tpm_faas.protocol.requests import WRITE_OPS, InterveneRequest
from tpm_faas.registry import GroupEntry, ModelInfo, Registry
from tpm_faas.runtime.decoder import Decoder
from tpm_faas.runtime.runner import LinearExtra, ModelRunner
from tpm_faas.runtime.scheduler import Scheduler
from tpm_faas.sites import BLOCK_SITES, GLOBAL_SITES
from tpm_faas.testing.shard import fake_site

DEMO, GPT2, QWEN = "demo-tpm@1", "gpt2-random@1", "qwen3-bpe@1"
DEMO_DIR = BUNDLED_MODELS / "demo-tpm" / "1"
RATES = {
    "per_request": 0.001,
    "input_token": 0.00001,
    "output_token": 0.00004,
    "gb_returned": 1.0,
    "hooked_site": 0.0001,
}
POLICY = {
    "version": 1,
    "default": "deny",
    "hold_ttl_s": 3600,
    "tiers": {"standard": 1.0},
    "models": {DEMO: RATES, GPT2: RATES, QWEN: RATES},
    "groups": [
        {
            "name": "developers",
            "match": {"identities": ["dev@localhost"]},
            "modes": ["query", "embed", "intervene"],
            "models": [DEMO, GPT2, QWEN],
            "allocation": "demo",
            "limits": {
                "max_prompts": 8,
                "max_prompt_tokens": 512,
                "max_new_tokens": 64,
                "max_input_bytes": 4_000_000,
                "max_bytes_returned": 200_000_000,
                "max_hook_sites": 64,
                "allowed_ops": [*WRITE_OPS, "save", "logit_lens"],
                "write": True,
            },
        }
    ],
}


class InProcessShards:
    """The shard seam, served by the runtime in this process (one rank, no ZeroMQ)."""

    def __init__(self, runners: dict[str, ModelRunner]) -> None:
        self.runners = runners
        self.decoders = {
            name: Decoder(r.model, slots=8, max_len=512) for name, r in runners.items()
        }

    def call(
        self, group: GroupEntry, op: str, body: dict[str, Any], *, request_id: str
    ) -> dict[str, Any]:
        name = group.model.name
        if op == "embed":
            return self.runners[name].embed(body)
        dec = self.decoders[name]
        tok = self.runners[name].tok
        sched = Scheduler(dec.run_plan, slots=dec.slots, max_len=dec.max_len, tokenizer=tok)
        sched.submit(0, request_id, body, intervene=op == "intervene")
        replies = []
        while sched.busy:
            replies += sched.step()
        ((_, reply),) = replies
        if not reply["ok"]:
            raise TPMError(str(reply["error"]))
        result: dict[str, Any] = reply["result"]
        return result


def _demo_runner() -> ModelRunner:
    model = AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()
    info = catalog.model_info(DEMO, DEMO_DIR, dtype="float32")
    tensors = load_file(str(DEMO_DIR / "extras.safetensors"))
    extras = {}
    for kind in ("adapters", "heads"):
        for ename in getattr(info, kind):
            b = tensors.get(f"{kind}.{ename}.bias")
            extras[f"{kind}.{ename}"] = LinearExtra(
                tensors[f"{kind}.{ename}.weight"].float(), None if b is None else b.float()
            )
    return ModelRunner(model, info, extras)


def _gpt2_runner() -> ModelRunner:
    model = random_gpt2()
    return ModelRunner(model, replace(info_of(model), name=GPT2), {})


def _qwen_runner(directory: Path) -> ModelRunner:
    """A published checkpoint (random weights, a BPE tokenizer trained on the corpus, a
    ChatML template), imported as a version."""
    model = published("qwen3", directory / "src")
    catalog.import_checkpoint(directory / "src", QWEN, directory / "root")
    info = catalog.model_info(QWEN, directory / "root" / "qwen3-bpe" / "1", dtype="float32")
    return ModelRunner(model, info, {})


class Site:
    """A gateway on real site components in a temporary home, over the in-process runtime."""

    def __init__(self, home: Path) -> None:
        runners = {DEMO: _demo_runner(), GPT2: _gpt2_runner(), QWEN: _qwen_runner(home / "qwen")}
        policy = home / "policy.yaml"
        home.mkdir(parents=True, exist_ok=True)
        policy.write_text(json.dumps(POLICY))
        self.shards = InProcessShards(runners)
        # A small inline limit, so that many results go by reference (a results file).
        self.gateway, tokens, _ = fake_site(
            home, policy, shard=self.shards, model=runners[DEMO].info, inline_limit_bytes=2000
        )
        for name in (GPT2, QWEN):
            Registry(self.gateway.settings.registry_dir).register(
                GroupEntry(
                    model=runners[name].info,
                    address=f"inproc://{name}",
                    tp_size=1,
                    pid=0,
                    host="localhost",
                    started_at=0.0,
                )
            )
        self.token = tokens["dev"]
        self.infos = {name: r.info for name, r in runners.items()}
        _INFOS[QWEN] = self.infos[QWEN]  # the strategies below draw from it
        self.n = 0

    def check(self, mode: str, request: dict[str, Any]) -> dict[str, Any]:
        """Run ``request``; assert what was counted and charged is within what was held."""
        self.n += 1
        request = {**request, "request_id": f"p{self.n}"}
        parsed = MODES[mode].request_model.model_validate(request)
        gw = self.gateway
        limits = gw.policy.decide(_caller(), mode=mode, model=request["model"]).limits
        admission = MODES[mode].admit(parsed, self.infos[request["model"]], limits)
        reply = gw.handle(mode, json.dumps(request), self.token)
        used, worst = reply["usage"], admission.worst
        assert used["bytes_returned"] <= worst.bytes_returned, (used, worst)
        assert used["input_tokens"] <= worst.input_tokens
        assert used["output_tokens"] <= worst.output_tokens
        assert used["hooked_sites"] <= worst.hooked_sites
        # The ledger caps a post at its hold: the post must never need it.
        price = gw.policy.decide(_caller(), mode=mode, model=request["model"]).price_micro
        fields = ("input_tokens", "output_tokens", "bytes_returned", "hooked_sites")
        actual = price(Usage(*(used[f] for f in fields)))
        assert actual <= price(worst)
        assert used["su"] == to_su(actual) and used["su_held"] == to_su(price(worst))
        return reply


def _caller() -> Caller:
    return Caller("dev@localhost", "dev", frozenset({"dev@localhost"}), frozenset())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return Site(tmp_path_factory.mktemp("pricing"))


# -- strategies --------------------------------------------------------------------------
TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_categories=["Cs"]),
        st.sampled_from('"\\\x00\n\x7f\xe9\u2420\U0001f600'),
    ),
    min_size=1,
    max_size=12,
)
PROMPTS = st.lists(TEXT, min_size=1, max_size=3)


def _vec(rng: np.random.Generator, shape: list[int], dtype: str = "float32") -> dict[str, Any]:
    return codec.encode_array(rng.normal(0, 0.5, size=shape).astype(np.float32), dtype)


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    model=st.sampled_from([DEMO, GPT2, QWEN]),
    prompts=PROMPTS,
    max_new=st.integers(1, 8),
    temperature=st.sampled_from([0.0, 0.8, 3.0]),
    logprobs=st.booleans(),
    stop=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_query_is_priced_within_its_hold(
    site: Site,
    model: str,
    prompts: list[str],
    max_new: int,
    temperature: float,
    logprobs: bool,
    stop: bool,
    seed: int,
) -> None:
    site.check(
        "query",
        {
            "model": model,
            "prompts": prompts,
            "max_new_tokens": max_new,
            "temperature": temperature,
            "logprobs": logprobs,
            "stop_at_eos": stop,
            "seed": seed,
        },
    )


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    model=st.sampled_from([DEMO, GPT2, QWEN]),
    batch=st.integers(1, 3),
    tokens=st.integers(1, 4),
    adapter=st.booleans(),
    head=st.booleans(),
    pooling=st.sampled_from(["mean", "last"]),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    seed=st.integers(0, 1000),
    two_d=st.booleans(),
)
def test_embed_is_priced_within_its_hold(
    site: Site,
    model: str,
    batch: int,
    tokens: int,
    adapter: bool,
    head: bool,
    pooling: str,
    dtype: str,
    seed: int,
    two_d: bool,
) -> None:
    info = site.infos[model]
    rng = np.random.default_rng(seed)
    shape = [tokens] if two_d else [batch, tokens]
    req: dict[str, Any] = {"model": model, "pooling": pooling}
    if adapter and info.adapters:
        name, spec = next(iter(info.adapters.items()))
        req |= {"adapter": name, "adapter_input": _vec(rng, [*shape, spec["in_features"]], dtype)}
    else:
        req["inputs_embeds"] = _vec(rng, [*shape, info.hidden_size], dtype)
    if head and info.heads:
        req["head"] = next(iter(info.heads))
    site.check("embed", req)


CHATS = st.lists(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}
        ),
        min_size=1,
        max_size=3,
    ),
    min_size=1,
    max_size=2,
)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    chats=CHATS,
    max_new=st.integers(1, 12),
    temperature=st.sampled_from([0.0, 1.5]),
    logprobs=st.booleans(),
    stop=st.lists(TEXT, max_size=2),
    stop_ids=st.lists(st.integers(0, 519), max_size=3),
    seed=st.integers(0, 1000),
)
def test_chat_query_with_stops_is_priced_within_its_hold(
    site: Site,
    chats: list[list[dict[str, str]]],
    max_new: int,
    temperature: float,
    logprobs: bool,
    stop: list[str],
    stop_ids: list[int],
    seed: int,
) -> None:
    """A checkpoint's own tokenizer: a token may decode to many characters."""
    site.check(
        "query",
        {
            "model": QWEN,
            "chats": chats,
            "max_new_tokens": max_new,
            "temperature": temperature,
            "logprobs": logprobs,
            "stop": stop,
            "stop_token_ids": stop_ids,
            "seed": seed,
        },
    )


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    model=st.sampled_from([DEMO, QWEN]), prompts=PROMPTS, pooling=st.sampled_from(["mean", "last"])
)
def test_text_embed_is_priced_within_its_hold(
    site: Site, model: str, prompts: list[str], pooling: str
) -> None:
    site.check("embed", {"model": model, "prompts": prompts, "pooling": pooling})


@st.composite
def intervene_requests(draw: st.DrawFn) -> dict[str, Any]:
    model = draw(st.sampled_from([DEMO, GPT2, QWEN]))
    prompts = draw(PROMPTS)
    max_new = draw(st.integers(0, 4))
    # Byte-level: BOS + bytes; the BPE tokenizer makes at least one token of any text.
    shortest = 1 if model == QWEN else min(len(p.encode()) + 1 for p in prompts)
    seed = draw(st.integers(0, 1000))
    return {
        "model": model,
        "prompts": prompts,
        "max_new_tokens": max_new,
        "temperature": draw(st.sampled_from([0.0, 2.0])),
        "seed": seed,
        "ops": draw(
            st.lists(_ops(model, len(prompts), shortest, max_new, seed), min_size=1, max_size=4)
        ),
    }


def _ops(model: str, n_prompts: int, shortest: int, max_new: int, seed: int) -> Any:
    @st.composite
    def op(draw: st.DrawFn) -> dict[str, Any]:
        info = _INFOS[model]
        layers = st.one_of(
            st.just("*"),
            st.lists(st.integers(0, info.num_layers - 1), min_size=1, max_size=3, unique=True),
        )
        pos = st.one_of(
            st.none(),
            st.lists(st.integers(0, shortest - 1), min_size=1, max_size=4, unique=True),
            st.builds(
                lambda a: {"start": a, "stop": shortest, "step": 1}, st.integers(0, shortest - 1)
            ),
        )
        heads = st.one_of(
            st.none(),
            st.lists(st.integers(0, info.num_heads - 1), min_size=1, max_size=4, unique=True),
        )
        gen = st.booleans() if max_new > 0 else st.just(False)
        kind = draw(
            st.sampled_from(
                ["save", "save", "logit_lens", "set", "add", "ablate", "scale_heads"]
                + (["patch"] if n_prompts > 1 else [])
            )
        )
        rng = np.random.default_rng(seed + draw(st.integers(0, 99)))
        if kind == "save":
            site_kind = draw(st.sampled_from([*BLOCK_SITES, *GLOBAL_SITES]))
            o: dict[str, Any] = {"op": "save", "site": site_kind, "positions": draw(pos)}
            if site_kind in BLOCK_SITES:
                o["layers"] = draw(layers)
            if site_kind == "attn.hook_z":
                o["heads"] = draw(heads)
            o["generation"] = draw(gen)
            return o
        if kind == "logit_lens":
            return {
                "op": "logit_lens",
                "site": draw(st.sampled_from(LENS_SITES)),
                "layers": draw(layers),
                "positions": draw(pos),
                "top_k": draw(st.integers(1, 6)),
            }
        if kind == "scale_heads":
            return {
                "op": "scale_heads",
                "layers": draw(layers),
                "heads": draw(heads),
                "scale": draw(st.floats(-2, 2)),
                "generation": draw(gen),
            }
        site_kind = draw(st.sampled_from(["hook_resid_pre", "hook_resid_post", "hook_mlp_out"]))
        o = {"op": kind, "site": site_kind, "layers": draw(layers)}
        if kind == "patch":
            return o | {"source": 0, "prompts": list(range(1, n_prompts)), "positions": [-1]}
        o |= {"positions": draw(pos), "generation": draw(gen)}
        if kind == "set":
            o["value"] = _vec(rng, [info.hidden_size])
        elif kind == "add":
            o |= {"vector": _vec(rng, [info.hidden_size]), "scale": draw(st.floats(-3, 3))}
        else:
            o["method"] = draw(st.sampled_from(["zero", "mean"]))
        return o

    return op()


_INFOS: dict[str, ModelInfo] = {
    DEMO: catalog.model_info(DEMO, DEMO_DIR, dtype="float32"),
    GPT2: info_of(random_gpt2()),
}


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(request=intervene_requests())
def test_intervene_is_priced_within_its_hold(site: Site, request: dict[str, Any]) -> None:
    site.check("intervene", request)


# -- the two inputs of issue 12 --------------------------------------------------------------
def test_defect_4_logit_lens_on_every_residual_site(site: Site) -> None:
    """8 prompts of 500 characters, the lens on resid_pre/mid/post of every layer at every
    position, top 1: was held at 2,308,608 bytes and returned 6,068,659."""
    request = {
        "model": DEMO,
        "prompts": [("In the beginning God created the heaven and the earth. " * 10)[:500]] * 8,
        "ops": [
            {"op": "logit_lens", "site": s, "layers": "*", "positions": None, "top_k": 1}
            for s in LENS_SITES
        ],
    }
    reply = site.check("intervene", request)
    assert reply["usage"]["bytes_returned"] > 6_000_000
    # Under the caller's 4,000,000-byte limit of the issue it is refused before it runs.
    parsed = InterveneRequest.model_validate(request)
    with pytest.raises(LimitExceeded, match="result size"):
        MODES["intervene"].admit(
            parsed, site.infos[DEMO], Limits(max_prompt_tokens=512, max_bytes_returned=4_000_000)
        )


def test_defect_5_every_site_saved_with_generation(site: Site) -> None:
    """Every site at every position, generated tokens too (8 prompts of 281 characters, 7 new
    tokens): was held at 63,999,744 bytes under a 64,000,000 limit and returned 64,056,211."""
    request = {
        "model": DEMO,
        "prompts": [("In the beginning God created the heaven and the earth. " * 6)[:281]] * 8,
        "max_new_tokens": 7,
        "stop_at_eos": False,
        "ops": [{"op": "save", "site": s, "layers": "*", "generation": True} for s in BLOCK_SITES]
        + [{"op": "save", "site": s, "generation": True} for s in GLOBAL_SITES],
    }
    reply = site.check("intervene", request)
    assert "tensors_ref" in reply["output"]
