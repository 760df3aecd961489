"""``tpm-faas plan``: the GPUs, layout, memory and decode rate a checkpoint needs."""

from __future__ import annotations

from pathlib import Path

import click

from tpm_faas.cli._app import echo_json, read_json


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def _params(n: int) -> str:
    return f"{n / 1e9:,.1f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M"


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--gpu", required=True, metavar="h100-80g|h200-141g|a100-80g", help="The GPU type.")
@click.option("--dtype", type=click.Choice(["bf16", "fp8"]), default="bf16", show_default=True,
              help="Weight precision (fp8: decoder linear weights in 1 byte).")  # fmt: skip
@click.option("--context", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Tokens (prompt + generated) each sequence holds.")  # fmt: skip
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequences served at once.")  # fmt: skip
@click.option("--decode-bw", "decode_bw", type=click.FloatRange(min=0, min_open=True),
              metavar="GBPS", default=None,
              help="Measured per-GPU bandwidth in GB/s (bench/decode.py's copy_bandwidth_gb_s) "
              "instead of the datasheet peak x 80 %.")  # fmt: skip
@click.option("--mla-cache", type=click.Choice(["expanded", "latent"]), default="expanded",
              show_default=True,
              help="Multi-head latent attention: cache expanded keys and values (what the "
              "decoder serves today) or the compressed latent.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plan(
    config: Path,
    gpu: str,
    dtype: str,
    context: int,
    concurrency: int,
    decode_bw: float | None,
    mla_cache: str,
    as_json: bool,
) -> None:
    """Plan serving the checkpoint whose config.json is CONFIG (the file or its directory).

    From config.json alone: total and active parameters, the smallest layout (TP inside a node
    of 8, EP over all GPUs for experts, pipeline stages over nodes for a large dense model) that
    holds the weights, the KV cache of CONTEXT tokens x CONCURRENCY sequences and a runtime
    reserve on each GPU; a decode-rate roofline and the SU (1 SU = 1 GPU-hour) per 1,000
    tokens. The arithmetic is in docs/planning.md.
    """
    from tpm_faas.planner import plan as make_plan

    path = config / "config.json" if config.is_dir() else config
    name = path.parent.name if path.name == "config.json" else path.stem
    p = make_plan(
        read_json(path, "config"),
        gpu=gpu,
        dtype=dtype,
        context=context,
        concurrency=concurrency,
        decode_bw_gb_s=decode_bw,
        name=name or str(path),
        what=str(path),
        mla_cache=mla_cache,
    )
    if as_json:
        echo_json(p.to_dict())
        return
    m, mem, b1, bc = p.model, p.memory, p.decode_batch1, p.decode_concurrent
    attention = {"mla": "multi-head latent attention", "gqa": "grouped-query attention",
                 "mha": "multi-head attention"}[m.attention]  # fmt: skip
    click.echo(
        f"{p.name}: {m.model_type}, {_params(m.total_params)} parameters, "
        f"{_params(m.active_params)} active per token"
    )
    shape = f"  {m.layers} layers, d_model {m.hidden_size}, {m.heads} heads, {attention}"
    if m.family == "moe":
        shape += (
            f"; {m.moe_layers} MoE layers of {m.experts} experts, {m.experts_per_token} per token"
            + (f" + {m.shared_experts} shared" if m.shared_experts else "")
        )
    click.echo(shape)
    click.echo(
        f"on {p.gpu.label}, {p.dtype} weights, {p.context:,} tokens x {p.concurrency} sequences:"
    )
    rows = [
        ("layout", p.layout.describe()),
        (
            "per GPU",
            f"weights {_gb(mem.weights)} + KV cache {_gb(mem.kv_cache)} + reserve "
            f"{_gb(mem.reserve)} = {_gb(mem.used)} of {_gb(mem.capacity)}",
        ),
        (
            "weights alone",
            f"{_gb(p.weights_total_bytes)}: at least {p.min_gpus_for_weights} GPUs "
            f"({p.min_nodes_for_weights} node{'s' if p.min_nodes_for_weights > 1 else ''})",
        ),
        (
            "decode",
            f"batch 1: {b1.tokens_per_s:,.1f} tok/s; batch {bc.batch}: "
            f"{bc.tokens_per_s:,.0f} tok/s (roofline at {p.bandwidth_gb_s:,.0f} GB/s per GPU)",
        ),
        ("bandwidth", p.bandwidth_source),
        (
            "SU",
            f"{bc.su_per_1k_tokens:.4g} SU per 1,000 tokens at batch {bc.batch} "
            f"(policy output_token {bc.su_per_1k_tokens / 1000:.3g}); "
            f"{b1.su_per_1k_tokens:.4g} at batch 1; 1 SU = 1 GPU-hour",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"  {key:<{width}}  {value}")
    for note in p.notes:
        click.echo(f"  note: {note}")
