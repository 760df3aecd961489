"""``tpm-faas demo``: one request in each mode through the whole embedded path.

It serves ``demo-chat@1``, a checkpoint in the published Hugging Face layout (a byte-level BPE
tokenizer with a Llama 3 chat template, imported with ``tpm-faas models add``;
``scripts/train_chat_model.py``): a chat, a plain prompt, text and adapter embeddings through
a registered head, a logit lens and steering. Beside it a second shard group serves
``demo-moe@1``, a small Qwen3-MoE (8 experts, 2 per token; ``scripts/train_moe_model.py``): the
same chat, the experts each token of a prompt chose at each MoE layer (read at the router's
hook sites), and the chat again with an expert knocked out.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpm_faas.client import Result, TPMClient
from tpm_faas.gateway.ledger import to_su
from tpm_faas.testing.embedded import DEV_USERS, EmbeddedSite

if TYPE_CHECKING:
    from tpm_faas.tokenizer import Tokenizer

MODEL = "demo-chat@1"
#: The mixture of experts served beside it, on one rank whatever ``tp_size`` is.
MOE_MODEL = "demo-moe@1"
PROMPT = "And God said, Let there be"
STEER_FROM = "the land of Egypt, and Pharaoh king of Egypt"
CHAT = [
    {"role": "system", "content": "You are a scribe who knows the Book of Genesis by heart."},
    {
        "role": "user",
        "content": "What comes after this verse? In the beginning God created the heaven and "
        "the earth.",
    },
]
VERSES = [
    "And the evening and the morning were the third day.",
    "And God said, Let there be light: and there was light.",
    "And Adam knew Eve his wife; and she conceived, and bare Cain, and said, "
    "I have gotten a man from the LORD.",
]


def run_demo(
    *,
    tp_size: int = 1,
    home: Path | None = None,
    emit: Callable[[str], None] = print,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Bring the embedded site up, run the modes, print the results and ledger, tear down.

    Returns a machine-readable summary (what ``--json`` prints).
    """
    tmp = None
    if home is None:
        tmp = tempfile.TemporaryDirectory(prefix="tpm-faas-demo-")
        home = Path(tmp.name)
    summary: dict[str, Any] = {"model": MODEL, "tp_size": tp_size, "modes": {}}
    t0 = time.monotonic()
    moe: _MoEGroup | None = None
    try:
        embedded = EmbeddedSite(home, tp_size=tp_size, model=MODEL)
        # The mixture of experts' shard group starts while the site does.
        moe = _MoEGroup(embedded, progress)
        with embedded.start(progress=progress) as site:
            summary["startup_s"] = round(time.monotonic() - t0, 2)
            client = site.client("dev")
            import numpy as np

            # -- query: a chat, then a plain prompt ----------------------------------
            chat = client.generate(messages=CHAT, max_new_tokens=48, logprobs=True)
            done = chat.output["completions"][0]
            lp = done["logprobs"][:8]
            _record(
                summary,
                chat,
                key="query_chat",
                text=chat.text,
                finish_reason=done["finish_reason"],
                logprobs=[{"token": x["token"], "logprob": x["logprob"]} for x in lp],
            )
            emit(_heading("query: a chat (the checkpoint's own chat template), greedy"))
            for m in CHAT:
                emit(f"  {m['role']:<9}: {m['content']!r}")
            emit(f"  assistant: {chat.text!r}")
            emit(
                f"  finish   : {done['finish_reason']} after {done['completion_tokens']} tokens "
                f"(prompt: {done['prompt_tokens']} tokens)"
            )
            emit("  logprobs : " + "  ".join(f"{x['token']!r} {x['logprob']:.2f}" for x in lp))
            emit(_usage_line(chat))

            q = client.generate(PROMPT, max_new_tokens=48, logprobs=True)
            lp = q.output["completions"][0]["logprobs"][:8]
            _record(
                summary, q, text=q.text, finish_reason=q.output["completions"][0]["finish_reason"]
            )
            emit(_heading("query: prompt -> text (greedy)"))
            emit(f"  prompt : {PROMPT!r}")
            emit(f"  output : {q.text!r}")
            emit(
                "  logprobs of the first tokens: "
                + "  ".join(f"{x['token']!r} {x['logprob']:.2f}" for x in lp)
            )
            emit(_usage_line(q))

            # -- embed: text through the head, then an input adapter -------------------
            t = client.embed(prompts=VERSES, head="regression")
            pred = t.tensor()[:, 0]
            _record(summary, t, key="embed_text")
            emit(_heading("embed: text -> frozen core -> mean pool -> head 'regression'"))
            emit("  the head predicts log(characters) of a text:")
            for v, y in zip(VERSES, pred.tolist(), strict=True):
                emit(f"  {np.exp(y):6.1f} (true {len(v):3d})  {v[:60]!r}")
            emit(_usage_line(t))

            rng = np.random.default_rng(0)
            feats = rng.standard_normal((3, 4, 16)).astype(np.float32)
            e = client.embed(adapter="features-linear", adapter_input=feats, head="regression")
            _record(summary, e)
            out = e.tensor()
            emit(_heading("embed: adapter 'features-linear' -> frozen core -> head 'regression'"))
            emit(f"  input  : feature vectors {list(feats.shape)} (batch, tokens, features)")
            emit(
                f"  output : head 'regression' {list(out.shape)} = "
                f"{[round(float(v), 4) for v in out[:, 0]]}"
            )
            emit(_usage_line(e))

            # -- intervene: logit lens and a saved residual, then steering -------------
            i1 = client.intervene(
                PROMPT,
                [
                    {"op": "logit_lens", "layers": "*", "positions": [-1], "top_k": 5},
                    {"op": "save", "site": "hook_resid_post", "layers": [1, 3], "positions": [-1]},
                    {"op": "save", "site": "attn.hook_z", "layers": [0], "positions": [-1]},
                ],
            )
            lens = i1.logit_lens
            _record(
                summary,
                i1,
                logit_lens=[
                    {
                        "layer": r["layer"],
                        "input_token": r["input_token"],
                        "top": [x["token"] for x in r["top"]],
                    }
                    for r in lens
                ],
            )
            emit(
                _heading(
                    f"intervene: logit lens at the last prompt token {lens[0]['input_token']!r} "
                    "(top 5 per layer)"
                )
            )
            for row in lens:
                tops = "  ".join(f"{x['token']!r:>9} {x['prob']:.2f}" for x in row["top"])
                emit(f"  layer {row['layer']}  {tops}")
            for site_name, arr in i1.saved.items():
                emit(
                    f"  saved {site_name}: {list(arr.shape)}, norm {float(np.linalg.norm(arr)):.2f}"
                )
            emit(_usage_line(i1))

            src = client.intervene(STEER_FROM, [{"op": "save", "site": "blocks.1.hook_resid_post"}])
            vec = src.saved["blocks.1.hook_resid_post"].mean(axis=0)
            i2 = client.intervene(
                PROMPT,
                [
                    {
                        "op": "add",
                        "site": "blocks.2.hook_resid_post",
                        "vector": vec,
                        "scale": 0.5,
                        "generation": True,
                    }
                ],
                max_new_tokens=48,
            )
            _record(summary, i2, key="intervene_steer", text=i2.text)
            emit(
                _heading(
                    "intervene: steering (add 0.5 x another text's mean resid_post at "
                    "layer 2, every token)"
                )
            )
            emit(f"  steered from : {STEER_FROM!r}")
            emit(f"  unsteered    : {q.text!r}")
            emit(f"  steered      : {i2.text!r}")
            emit(_usage_line(i2))

            # -- the mixture of experts: a chat, its routing, an expert knocked out ------
            t_moe = time.monotonic()
            summary["moe"] = _moe_demo(site, moe, emit)
            summary["moe"]["wall_s"] = round(time.monotonic() - t_moe, 2)

            # -- the ledger -----------------------------------------------------------
            ledger = site.ledger()
            project = DEV_USERS["dev"].project
            bal = ledger.balance(project)
            charges = ledger.charges(project)
            open_holds = ledger.open_holds()
            ledger.close()
            emit(_heading(f"SU ledger of project {project!r}"))
            emit(f"  {'request':<38} {'mode':<10} {'held SU':>10} {'charged SU':>11}")
            for c in charges:
                emit(
                    f"  {c['request_id']:<38} {c['mode']:<10} "
                    f"{to_su(c['amount']):>10.6f} {to_su(c['charged']):>11.6f}"
                )
            emit(
                f"  credited {to_su(bal.credited):.6f}  charged {to_su(bal.charged):.6f}  "
                f"held {to_su(bal.held):.6f}  available {to_su(bal.available):.6f}"
            )
            summary["ledger"] = {
                "project": project,
                "credited_su": to_su(bal.credited),
                "charged_su": to_su(bal.charged),
                "held_su": to_su(bal.held),
                "open_holds": len(open_holds),
                "charges": len(charges),
            }
    finally:
        if moe is not None:
            moe.stop()
        if tmp is not None:
            tmp.cleanup()
    summary["ok"] = (
        all(m["ok"] for m in summary["modes"].values())
        and all(m["ok"] for m in summary["moe"]["modes"].values())
        and summary["ledger"]["open_holds"] == 0
    )
    summary["total_s"] = round(time.monotonic() - t0, 2)
    return summary


def _record(summary: dict[str, Any], r: Result, key: str | None = None, **shown: Any) -> None:
    """A request's entry in the summary's ``modes``: its id, SU, usage and receipt, and what
    was shown."""
    summary["modes"][key or r.mode] = {
        "ok": True,
        "request_id": r.request_id,
        "su": r.usage.su,
        "usage": r.usage.model_dump(mode="json", exclude_none=True),
        "receipt": r.receipt.model_dump(mode="json", exclude_none=True),
        **shown,
    }


class _MoEGroup:
    """The shard group of :data:`MOE_MODEL` beside the site's, started in the background."""

    def __init__(self, site: EmbeddedSite, progress: Callable[[str], None] | None) -> None:
        from tpm_faas.launcher import ShardGroup

        self.group = ShardGroup(
            MOE_MODEL, 1, site.settings, site.home / "runs" / "shards-moe", dtype=site.dtype
        )
        self.failure: BaseException | None = None
        say = progress or (lambda _m: None)

        def start() -> None:
            try:
                self.group.start(progress=lambda m: say(f"{MOE_MODEL}: {m}"))
            except BaseException as e:  # raised in the caller by wait()
                self.failure = e

        self._thread = threading.Thread(target=start, name="start-moe-group", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until the group serves; its start's failure is raised here."""
        self._thread.join()
        if self.failure is not None:
            raise self.failure

    def stop(self) -> None:
        self._thread.join()
        self.group.stop()


def _moe_demo(site: EmbeddedSite, moe: _MoEGroup, emit: Callable[[str], None]) -> dict[str, Any]:
    """The mixture of experts' sections: its chat answer, the experts each token of a prompt
    chose at each MoE layer, and the chat with the most used expert knocked out."""
    from tpm_faas.architectures import moe_of
    from tpm_faas.catalog import resolve
    from tpm_faas.tokenizer import HFTokenizer

    moe.wait()
    out: dict[str, Any] = {"model": MOE_MODEL, "tp_size": 1, "modes": {}}
    model_dir = resolve(MOE_MODEL, site.settings.model_roots)
    routed = moe_of(json.loads((model_dir / "config.json").read_text()))
    assert routed is not None, f"{MOE_MODEL} is not a mixture of experts"
    n_experts, top_k = routed.num_experts, routed.top_k
    client = TPMClient(site.transport, token=site.tokens["dev"], model=MOE_MODEL)

    chat = client.generate(messages=CHAT, max_new_tokens=48)
    done = chat.output["completions"][0]
    _record(out, chat, key="query_chat", text=chat.text, finish_reason=done["finish_reason"])
    emit(
        _heading(
            f"{MOE_MODEL}: a mixture of experts (Qwen3-MoE, {n_experts} experts, {top_k} per "
            "token), the same chat"
        )
    )
    emit(f"  assistant: {chat.text!r}")
    emit(
        f"  finish   : {done['finish_reason']} after {done['completion_tokens']} tokens "
        f"(prompt: {done['prompt_tokens']} tokens)"
    )
    emit(_usage_line(chat))

    # Which experts each prompt token chose: the routing's outcome, read at every MoE layer.
    r = client.intervene(
        PROMPT,
        [
            {"op": "save", "site": "mlp.hook_expert_indices", "layers": "*"},
            {"op": "save", "site": "mlp.hook_expert_weights", "layers": "*"},
        ],
    )
    routing = _routing_table(r, HFTokenizer(model_dir))
    _record(out, r, key="intervene_routing")
    out["routing"] = routing
    emit(_heading("intervene: the experts each token chose at each MoE layer (routing)"))
    emit(f"  prompt : {PROMPT!r}")
    emit(
        f"  saved  : mlp.hook_expert_indices and mlp.hook_expert_weights at layers "
        f"{', '.join(map(str, routing['layers']))}: the {top_k} of {n_experts} experts chosen, "
        "heaviest first, and their weights"
    )
    layers = routing["layers"]
    emit("  " + f"{'token':<12}" + "".join(f"{'layer ' + str(i):<16}" for i in layers))
    for row in routing["rows"]:
        cells = [
            ",".join(map(str, ex)) + " " + "/".join(f"{w:.2f}" for w in ws)
            for ex, ws in zip(row["experts"], row["weights"], strict=True)
        ]
        emit("  " + f"{row['token']!r:<12}" + "".join(f"{c:<16}" for c in cells))
    emit(_usage_line(r))

    # Knock out the expert the prompt's tokens chose most at the first MoE layer.
    layer = layers[0]
    counts = [0] * n_experts
    for row in routing["rows"]:
        for e in row["experts"][0]:
            counts[e] += 1
    expert = max(range(n_experts), key=lambda e: (counts[e], -e))
    k = client.intervene(
        None,
        [
            {
                "op": "drop_experts",
                "site": "mlp.hook_router_logits",
                "layers": [layer],
                "experts": [expert],
                "generation": True,
            }
        ],
        messages=CHAT,
        max_new_tokens=48,
    )
    _record(out, k, key="intervene_drop_experts", layer=layer, expert=expert, text=k.text)
    emit(
        _heading(
            f"intervene: the chat with expert {expert} of layer {layer} knocked out "
            "(drop_experts, every token)"
        )
    )
    emit(f"  routed as trained  : {chat.text!r}")
    emit(f"  {'without expert ' + str(expert):<19}: {k.text!r}")
    emit(_usage_line(k))
    return out


def _routing_table(r: Result, tok: Tokenizer) -> dict[str, Any]:
    """The experts (heaviest first) and weights each prompt token chose at each MoE layer of
    an intervene result that saved ``mlp.hook_expert_indices`` and ``hook_expert_weights`` at
    every MoE layer: ``{"layers": [...], "rows": [{"position", "token", "experts": [per
    layer], "weights": [per layer]}]}``."""
    suffix = ".mlp.hook_expert_indices"
    names = [n for n in r.saved if n.endswith(suffix)]
    layers = sorted(int(n.split(".")[1]) for n in names)
    entry = r.saved_entry(f"blocks.{layers[0]}{suffix}")
    positions = list(entry.positions) or list(range(entry.tensor.shape[0]))
    ids = tok.encode(PROMPT)
    rows = []
    for row, pos in enumerate(positions):
        experts = [[int(x) for x in r.saved[f"blocks.{i}{suffix}"][row]] for i in layers]
        weights = [
            [round(float(w), 4) for w in r.saved[f"blocks.{i}.mlp.hook_expert_weights"][row]]
            for i in layers
        ]
        token = tok.token_str(ids[pos]) if 0 <= pos < len(ids) else f"<{pos}>"
        rows.append({"position": pos, "token": token, "experts": experts, "weights": weights})
    return {"prompt": PROMPT, "layers": layers, "rows": rows}


def _heading(text: str) -> str:
    return f"\n== {text} " + "=" * max(0, 86 - len(text))


def _usage_line(r: Result) -> str:
    u = r.usage
    return (
        f"  usage  : {u.input_tokens} tokens in, {u.output_tokens} out, "
        f"{u.bytes_returned} bytes, {u.hooked_sites} hook sites -> {u.su:.6f} SU "
        f"(held {u.su_held:.6f}); receipt: checkpoint {r.receipt.checkpoint_sha256[:12]}, "
        f"request {r.receipt.request_sha256[:12]}"
    )


def dumps(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=True)
