"""A shard group without a model: :class:`FakeShard` answers the typed shard messages of every
mode with outputs of the right shape, so the gateway's whole pipeline (auth, policy, ledger,
rate limits, usage, receipt, by-reference results) runs in one process.

Plug it into a gateway with :func:`fake_site` (a real policy file, dev tokens, SQLite ledger and
registry in a directory of your choosing), or pass it as ``shards=`` to
:meth:`tpm_faas.gateway.pipeline.Gateway.from_settings`.

The values it returns are deterministic but meaningless (zeros, and ``"x"`` as every generated
token); their sizes are the largest the request allows (every new token generated, every
saved row present), which makes it the worst case the admission estimate must bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpm_faas.errors import RequestError, TPMError
from tpm_faas.modes import by_shard_op
from tpm_faas.modes.intervene import model_shape
from tpm_faas.protocol import codec
from tpm_faas.protocol.shard import EmbedBody, InterveneBody, QueryBody, parse_body
from tpm_faas.registry import GroupEntry, ModelInfo
from tpm_faas.sites import ModelShape, Site, parse_site
from tpm_faas.tokenizer import ByteTokenizer

#: A small Llama-shaped model (the demo model's shape) for tests that need one.
FAKE_MODEL = ModelInfo(
    name="demo-tpm@1",
    hidden_size=256,
    num_layers=4,
    vocab_size=264,
    max_positions=512,
    tokenizer="bytes",
    checkpoint_sha256="0" * 64,
    dtype="float32",
    architecture="llama",
    num_heads=8,
    head_dim=32,
)


@dataclass(frozen=True)
class ShardCall:
    """One message the fake received."""

    op: str
    request_id: str
    body: dict[str, Any]
    group: GroupEntry


@dataclass
class FakeShard:
    """Answers shard messages like a shard group would, without a model.

    :param fail: raised for every call (a :class:`~tpm_faas.errors.TPMError`, e.g.
        ``ShardTimeout``), to exercise the gateway's void path
    :param reply: replaces the output of every call (``reply(op, body)``), e.g. to send a
        malformed output
    :param new_tokens: generate at most this many tokens per prompt (default: all that
        ``max_new_tokens`` allows)
    """

    fail: TPMError | None = None
    reply: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
    new_tokens: int | None = None
    calls: list[ShardCall] = field(default_factory=list)

    def call(
        self, group: GroupEntry, op: str, body: dict[str, Any], *, request_id: str
    ) -> dict[str, Any]:
        self.calls.append(ShardCall(op, request_id, body, group))
        if self.fail is not None:
            raise self.fail
        if self.reply is not None:
            return self.reply(op, body)
        mode = by_shard_op(op)
        if mode is None:
            raise RequestError(f"unknown shard op {op!r}")
        parsed = parse_body(mode.shard_body, body)  # what rank 0 does first
        if isinstance(parsed, QueryBody):
            return {"completions": [self._completion(p, parsed) for p in parsed.prompt_ids]}
        if isinstance(parsed, EmbedBody):
            return _embed(parsed, group.model)
        if isinstance(parsed, InterveneBody):
            return _intervene(self, parsed, group.model)
        raise RequestError(f"the fake shard cannot run {op!r}")

    def _completion(self, prompt: list[int], b: QueryBody | InterveneBody) -> dict[str, Any]:
        tok = ByteTokenizer()
        n = b.max_new_tokens if self.new_tokens is None else min(self.new_tokens, b.max_new_tokens)
        ids = tok.encode("x" * n, add_special=False)
        out: dict[str, Any] = {
            "text": tok.decode(ids),
            "token_ids": ids,
            "prompt_tokens": len(prompt),
            "completion_tokens": len(ids),
            "seconds": 0.0,
            "finish_reason": "length",
        }
        if getattr(b, "logprobs", False):
            out["logprobs"] = [{"token": tok.token_str(t), "id": t, "logprob": 0.0} for t in ids]
        return out


def _zeros(shape: list[int]) -> dict[str, Any]:
    return codec.encode(bytes(4 * _prod(shape)), "float32", shape)


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _embed(b: EmbedBody, model: ModelInfo) -> dict[str, Any]:
    if b.input_ids is not None:
        batch, n_tokens = len(b.input_ids), sum(len(i) for i in b.input_ids)
    else:
        t = b.inputs_embeds if b.inputs_embeds is not None else b.adapter_input
        assert t is not None
        batch, tokens = (1, t.shape[0]) if len(t.shape) == 2 else (t.shape[0], t.shape[1])
        n_tokens = batch * tokens
    width = int(model.heads[b.head]["out_features"]) if b.head else model.hidden_size
    out: dict[str, Any] = {
        "input_tokens": n_tokens,
        "pooling": b.pooling,
        "output": _zeros([batch, width]),
    }
    if b.head:
        out["head"] = b.head
    return out


def _intervene(fake: FakeShard, b: InterveneBody, model: ModelInfo) -> dict[str, Any]:
    m = model_shape(model)
    tok = ByteTokenizer()
    runs = []
    for index, prompt in enumerate(b.prompt_ids):
        run = fake._completion(prompt, b)
        n_prompt, n_new = run["prompt_tokens"], run["completion_tokens"]
        saves: dict[str, dict[str, Any]] = {}
        lens: list[dict[str, Any]] = []
        for op in b.ops:
            if index not in op.prompts:
                continue
            positions = op.positions[op.prompts.index(index)]
            for name in op.sites:
                site = parse_site(name, m)
                if op.op == "save":
                    entry = saves.setdefault(name, {"positions": [], "heads": None, "gen": False})
                    entry["positions"] += [p for p in positions if p not in entry["positions"]]
                    if op.heads is not None:
                        entry["heads"] = list(dict.fromkeys([*(entry["heads"] or []), *op.heads]))
                    entry["gen"] = entry["gen"] or op.generation
                elif op.op == "logit_lens":
                    lens += [_lens_row(site, p, prompt, op.top_k or 1, tok) for p in positions]
        run["saved"] = {
            name: _saved(parse_site(name, m), e, m, n_prompt, n_new) for name, e in saves.items()
        }
        run["logit_lens"] = lens
        runs.append(run)
    return {"results": runs}


def _saved(
    site: Site, e: dict[str, Any], m: ModelShape, n_prompt: int, n_new: int
) -> dict[str, Any]:
    positions = list(e["positions"])
    if e["gen"]:  # k new tokens: the first k - 1 are fed back through the model
        positions += list(range(n_prompt, n_prompt + max(n_new - 1, 0)))
    shape = site.shape(m)
    entry: dict[str, Any] = {"positions": positions}
    if site.per_head:
        heads = e["heads"] if e["heads"] is not None else list(range(m.num_heads))
        shape = [len(heads), m.head_dim]
        entry["heads"] = heads
    entry["tensor"] = _zeros([len(positions), *shape])
    return entry


def _lens_row(site: Site, p: int, ids: list[int], top_k: int, tok: ByteTokenizer) -> dict[str, Any]:
    top = [{"token": tok.token_str(255), "id": 255, "prob": 1.0 / top_k}] * top_k
    return {
        "site": site.name,
        "layer": site.layer,
        "position": p,
        "input_token": tok.token_str(ids[p]),
        "top": top,
    }


def fake_site(
    home: Path,
    policy: Path | None = None,
    *,
    shard: FakeShard | None = None,
    model: ModelInfo = FAKE_MODEL,
    **settings: Any,
) -> tuple[Any, dict[str, str], FakeShard]:
    """A gateway on real site components in ``home`` (dev tokens, ``policy`` — the bundled
    local-dev policy by default —, SQLite ledger with the dev projects credited, registry)
    whose shard group is ``shard``. ``settings`` override fields of
    :class:`~tpm_faas.config.Settings` (e.g. ``inline_limit_bytes``).

    :returns: the :class:`~tpm_faas.gateway.pipeline.Gateway`, the dev users' tokens by name,
        and the fake shard
    """
    from tpm_faas.config import Settings
    from tpm_faas.gateway.ledger import Ledger
    from tpm_faas.gateway.pipeline import Gateway
    from tpm_faas.registry import Registry
    from tpm_faas.testing.embedded import DEV_USERS, write_dev_tokens

    env = {"TPM_FAAS_HOME": str(home), "TPM_FAAS_DEV_TOKENS": str(home / "tokens.yaml")}
    if policy is not None:
        env["TPM_FAAS_POLICY"] = str(policy)
    site = Settings.from_env(env, **settings)
    tokens = write_dev_tokens(home / "tokens.yaml")
    ledger = Ledger(site.ledger_url)
    for user in DEV_USERS.values():
        ledger.credit(user.project, round(user.su * 1e6), reference=f"seed:{user.project}")
    ledger.close()
    Registry(site.registry_dir).register(
        GroupEntry(
            model=model,
            address="fake://shard",
            tp_size=1,
            pid=0,
            host="localhost",
            started_at=0.0,
        )
    )
    shard = shard or FakeShard()
    return Gateway.from_settings(site, shards=shard), tokens, shard
