"""``mhc-train-plan``: the mesh layouts that fit a cluster, ranked by communication per step.
The recommendation is the first of them whose pipeline is busy (simulated bubble at most
``cluster.max_bubble``; always without a pipeline).

    mhc-train-plan model=27b residual=mhc cluster.gpus=32 cluster.gpu_mem_gb=80 \\
                   [cluster.gpus_per_node=8] [train.seq_len=4096] [train.global_batch=1280] \\
                   [--json] [--top N] [--all]

Arguments are ``key=value`` as for ``mhc-train-info`` (``model``, ``residual``, ``model.FIELD``,
``residual.FIELD``, parsed by its ``parse_args``) plus ``cluster.*`` and ``train.*`` (below). An
unknown key or a bad value exits with status 2 and one line on stderr that names it. The
estimates are ``mhc_train.parallel.planner``'s (its docstring has the formulas).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, fields

import yaml

from mhc_train.model.config import load_model_config
from mhc_train.model.info import UsageError, _coerce, fmt_count, load_residual_config, parse_args
from mhc_train.parallel.planner import (
    GB,
    GIB,
    MEMORY_PARTS,
    PAPER_GLOBAL_BATCH,
    PRECISIONS,
    Cluster,
    Estimate,
    Plan,
    plan,
)

PROG = "mhc-train-plan"
CLUSTER_KEYS = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(Cluster)}
TRAIN_KEYS = {"seq_len": "int", "global_batch": "int", "precision": "str"}
USAGE = f"""usage: {PROG} [model=SIZE] [residual=VARIANT] [cluster.KEY=VALUE ...] [train.KEY=VALUE ...]
                      [model.FIELD=VALUE ...] [residual.FIELD=VALUE ...] [--json] [--top N] [--all]

  model=SIZE, residual=VARIANT, model.FIELD, residual.FIELD   as for mhc-train-info (default 27b, mhc)
  cluster.gpus=G            GPUs in all (default 8)
  cluster.gpu_mem_gb=M      memory per GPU in GiB (default 80)
  cluster.gpus_per_node=K   GPUs per node (default 8): groups that span nodes use the inter-node rate
  cluster.intra_gbps=B      GB/s per GPU inside a node (default 450, NVLink)
  cluster.inter_gbps=B      GB/s per GPU between nodes (default 50, a 400 Gb/s NIC per GPU)
  cluster.headroom=F        share of the memory kept free (default 0.10: CUDA context, NCCL, allocator)
  cluster.tflops=T          achieved bf16 TFLOP/s per GPU, for the step-time column (default 400)
  cluster.max_bubble=F      a pipeline is busy when its simulated bubble is at most F (default 0.20)
  train.seq_len=S           tokens per sequence (default: model.max_seq_len)
  train.global_batch=B      sequences per step (default: the paper's 320 / 512 / 1280 for 3b / 9b / 27b,
                            else 8 per GPU)
  train.precision=P         bf16 (autocast, fp32 master weights; default) or fp32
  --json                    one JSON document instead of the table
  --top N                   rows of the table / fitting layouts in the JSON (default 10 / all)
  --all                     the JSON lists every layout, not only the fitting ones and 10 nearest misses"""


def parse_plan_args(argv: list[str]):
    """-> (model name, model cfg, residual cfg, Cluster, seq_len, global_batch, precision, options)."""
    options = {"json": False, "top": None, "all": False}
    cluster: dict[str, object] = {}
    train: dict[str, object] = {}
    passed: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--json":
            options["json"] = True
        elif arg == "--all":
            options["all"] = True
        elif arg == "--top" or arg.startswith("--top="):
            text = arg.partition("=")[2] if "=" in arg else next(args, None)
            if text is None:
                raise UsageError("--top: expected a number of rows")
            top = _coerce("--top", text, "int")
            if top < 1:
                raise UsageError(f"--top: must be >= 1, got {top}")
            options["top"] = top
        elif arg.startswith("-"):
            raise UsageError(f"{arg}: unknown option (known: --json, --top N, --all)")
        else:
            key, sep, text = arg.partition("=")
            section, dot, name = key.strip().partition(".")
            if sep and dot and section == "cluster":
                if name not in CLUSTER_KEYS:
                    raise UsageError(f"{key}: unknown key (known: {', '.join('cluster.' + k for k in CLUSTER_KEYS)})")
                cluster[name] = _coerce(key, text, CLUSTER_KEYS[name])
            elif sep and dot and section == "train":
                if name not in TRAIN_KEYS:
                    raise UsageError(f"{key}: unknown key (known: {', '.join('train.' + k for k in TRAIN_KEYS)})")
                train[name] = _coerce(key, text, TRAIN_KEYS[name])
            elif sep and (section in ("model", "residual") or key.strip() == "seq_len"):
                passed.append(arg)
            elif sep:
                raise UsageError(f"{key}: unknown key (known: model, residual, model.*, residual.*, cluster.*, "
                                 "train.*)")
            else:
                raise UsageError(f"{arg!r}: expected key=value")
    model_name, variant, model_over, residual_over, seq_len = parse_args(passed)
    model_cfg = load_model_config(model_name, **model_over)
    residual_cfg = load_residual_config(variant, residual_over)
    cl = Cluster(**{"gpus": 8, **cluster})
    cl.validate()
    seq_len = train.get("seq_len", seq_len if seq_len is not None else model_cfg.max_seq_len)
    if seq_len < 1:
        raise UsageError(f"train.seq_len: must be >= 1, got {seq_len}")
    if seq_len > model_cfg.max_seq_len:
        raise UsageError(f"train.seq_len: {seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    batch = train.get("global_batch", PAPER_GLOBAL_BATCH.get(model_name) if not model_over else None)
    batch = 8 * cl.gpus if batch is None else batch
    if batch < 1:
        raise UsageError(f"train.global_batch: must be >= 1, got {batch}")
    precision = train.get("precision", "bf16")
    if precision not in PRECISIONS:
        raise UsageError(f"train.precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return model_name, model_cfg, residual_cfg, cl, seq_len, batch, precision, options


# ------------------------------------------------------------------------------------ output


def _num(x: float, big: str) -> str:
    """``big`` formatting from 1 up, two significant digits below (the tiny models' sizes)."""
    return format(x, big) if abs(x) >= 1 or x == 0 else f"{x:.2g}"


def _gib(x: float) -> str:
    return _num(x / GIB, ".1f")


def _gb(x: float) -> str:
    return _num(x / GB, ".0f")


def describe_layout(e: Estimate) -> str:
    lay = e.layout
    d = lay.degrees
    pipe = f", {lay.schedule}" if lay.schedule else ""
    reshard = {None: "", True: ", reshard", False: ", no reshard"}[lay.reshard]
    return (f"pp={d.pp} x dp_replicate={d.dp_replicate} x dp_shard={d.dp_shard}, ep={d.ep}{pipe}, "
            f"{lay.microbatches} micro-batches of {lay.micro_batch}, recompute {'on' if lay.recompute else 'off'}"
            f"{reshard}")


def recommendation(result: Plan) -> str:
    e = result.recommended
    if e is None:
        if result.fitting:
            return (f"recommended: none - {len(result.fitting)} layouts fit but every pipeline among them idles more "
                    f"than {result.cluster.max_bubble:.0%} of the time; lower cluster.max_bubble's bar or add GPUs")
        return "recommended: none fits - add GPUs or memory, or shorten train.seq_len"
    bubble = f", bubble {e.bubble:.1%}" if e.layout.degrees.pp > 1 else ""
    return (f"recommended: {describe_layout(e)} - the least communication among the {len(result.fitting)} layouts "
            f"that fit ({_num(e.comm['time_s'], '.2f')} s/step: {_gb(e.comm['intra_node'])} GB intra-node, "
            f"{_gb(e.comm['inter_node'])} GB inter-node per GPU), {_gib(e.bytes_per_gpu['total'])} GiB per GPU"
            f"{bubble}, est. step {_num(e.step_s, '.1f')} s")


HEAD = ["#", "pp", "rep", "shard", "ep", "schedule", "mb", "m", "rec", "reshard", "static", "unshard", "accum",
        "act/mb", "in flight", "a2a", "transient", "total GiB", "intra GB", "inter GB", "comm s", "bubble", "step s"]


def _row(i, e: Estimate) -> list[str]:
    lay, b = e.layout, e.bytes_per_gpu
    d = lay.degrees
    static = b["params"] + b["grads"] + b["optimizer"]
    return [str(i), str(d.pp), str(d.dp_replicate), str(d.dp_shard), str(d.ep), lay.schedule or "-",
            str(lay.micro_batch), str(lay.microbatches), "on" if lay.recompute else "off",
            {None: "-", True: "yes", False: "no"}[lay.reshard], _gib(static),
            *(_gib(b[p]) for p in ("params_unsharded", "grad_accumulation", "activations", "activations_in_flight",
                                   "all_to_all", "transient", "total")),
            _gb(e.comm["intra_node"]), _gb(e.comm["inter_node"]), _num(e.comm["time_s"], ".2f"),
            f"{100 * e.bubble:.1f}%" if d.pp > 1 else "-", _num(e.step_s, ".1f")]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEAD)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(HEAD, widths)), "  ".join("-" * w for w in widths)]
    return lines + ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]


def render(result: Plan, model_cfg, residual_cfg, precision: str, top: int) -> str:
    cl = result.cluster
    n = residual_cfg.streams
    lines = [f"model={result.model_name} ({fmt_count(result.parameters)} parameters)  "
             f"residual={residual_cfg.variant} n={n}  {cl.gpus} GPUs "
             f"({cl.gpus_per_node} per node) x {cl.gpu_mem_gb:g} GiB, usable {_gib(cl.usable_bytes)} GiB "
             f"({cl.headroom:.0%} headroom)  global batch {result.global_batch} x {result.seq_len} tokens  {precision}",
             f"links {cl.intra_gbps:g} GB/s intra-node, {cl.inter_gbps:g} GB/s inter-node per GPU; step time at "
             f"{cl.tflops:g} TFLOP/s per GPU, communication not overlapped; busy pipeline: bubble <= "
             f"{cl.max_bubble:.0%}", ""]
    fitting, misses = result.fitting, result.misses
    if fitting:
        lines.append(f"best {min(top, len(fitting))} of {len(fitting)} layouts that fit (GiB per GPU of the worst "
                     "pipeline rank; static = fp32 params + grads + AdamW, sharded; unshard = compute copies of the "
                     "weights; accum = FSDP2's unsharded fp32 gradients between micro-batches):")
        lines += _table([_row(i + 1, e) for i, e in enumerate(fitting[:top])])
    else:
        lines.append("no layout fits")
    lines.append("")
    lines.append(f"{len(misses)} layouts do not fit" + (", the nearest misses:" if misses else ""))
    if misses:
        lines += _table([_row("-", e) for e in misses[:3]])
    lines += ["", recommendation(result)]
    return "\n".join(lines)


def to_json(result: Plan, model_cfg, residual_cfg, precision: str, top: int | None, every: bool) -> dict:
    fitting = result.fitting if top is None else result.fitting[:top]
    misses = result.misses if every else result.misses[:10]
    return {
        "model": result.model_name, "model_config": model_cfg.to_dict(), "residual": asdict(residual_cfg),
        "cluster": asdict(result.cluster), "seq_len": result.seq_len, "global_batch": result.global_batch,
        "precision": precision, "parameters": result.parameters,
        "usable_bytes_per_gpu": int(result.cluster.usable_bytes),
        "memory_parts": list(MEMORY_PARTS) + ["total"],
        "counts": {"layouts": len(result.estimates), "fit": len(result.fitting),
                   "listed_fit": len(fitting), "listed_misses": len(misses)},
        "recommended": None if result.recommended is None else result.recommended.to_json(),
        "recommendation": recommendation(result),
        "layouts": [e.to_json() for e in fitting + misses],
    }


def _usage_error(exc: Exception) -> None:
    """One line on stderr naming the key, exit status 2 (as mhc-train-info does)."""
    print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help", "help"} & set(argv):
        return print(USAGE)
    try:
        name, model_cfg, residual_cfg, cluster, seq_len, batch, precision, options = parse_plan_args(argv)
        result = plan(model_cfg, residual_cfg, cluster, seq_len, batch, model_name=name, precision=precision)
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        _usage_error(exc)
    try:
        if options["json"]:
            print(json.dumps(to_json(result, model_cfg, residual_cfg, precision, options["top"], options["all"]),
                             indent=1))
        else:
            print(render(result, model_cfg, residual_cfg, precision, options["top"] or 10))
    except BrokenPipeError:
        sys.stderr.close()


if __name__ == "__main__":
    main()
