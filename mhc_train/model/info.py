"""``mhc-train-info``: parameters, FLOPs and residual-stream memory of a config, nothing allocated.

    mhc-train-info model=27b residual=mhc [residual.n=8] [residual.t_max=10] \\
                   [model.n_layers=4] [seq_len=4096]

Arguments are ``key=value``: ``model`` (a size in configs/model/), ``residual`` (a variant in
configs/residual/), ``seq_len`` (default: the model's max_seq_len), and ``model.FIELD`` /
``residual.FIELD`` overrides of the ModelConfig / ResidualConfig fields. An unknown key or a
bad value exits with status 2 and one line on stderr that names it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import fields

import yaml

from mhc_train.model.config import CONFIG_ROOT, ModelConfig, load_model_config
from mhc_train.residual.config import ResidualConfig

PROG = "mhc-train-info"
USAGE = f"""usage: {PROG} [model=SIZE] [residual=VARIANT] [seq_len=S] [model.FIELD=VALUE ...] [residual.FIELD=VALUE ...]

  model=SIZE              configs/model/SIZE.yaml (tiny, small, 3b, 9b, 27b; default 27b)
  residual=VARIANT        configs/residual/VARIANT.yaml (baseline, hc, mhc; default mhc)
  seq_len=S               sequence length for the attention FLOPs (default: model.max_seq_len)
  model.FIELD=VALUE       override a ModelConfig field, e.g. model.n_layers=4
  residual.FIELD=VALUE    override a ResidualConfig field, e.g. residual.n=8 residual.t_max=10

Parameters and FLOPs are counted on a meta-device model: nothing is allocated."""
DEFAULTS = {"model": "27b", "residual": "mhc", "seq_len": None}  # seq_len: the model's max_seq_len


class UsageError(ValueError):
    pass


# --------------------------------------------------------------------------------- arguments


def _parse_scalar(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _coerce(key: str, text: str, type_name: str):
    """The override ``text`` as the dataclass field's type (annotations are strings here)."""
    value = _parse_scalar(text)
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{key}: expected an integer, got {text!r}")
    elif type_name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"{key}: expected a number, got {text!r}")
        value = float(value)
    elif type_name == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{key}: expected true or false, got {text!r}")
    else:
        value = text
    return value


def _field_types(cls) -> dict[str, str]:
    return {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(cls)}


def parse_args(argv: list[str]):
    """-> (model name, residual variant, model overrides, residual overrides, seq_len)."""
    top: dict[str, str] = {}
    model_over: dict[str, object] = {}
    residual_over: dict[str, object] = {}
    model_types, residual_types = _field_types(ModelConfig), _field_types(ResidualConfig)
    for arg in argv:
        key, sep, text = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{arg!r}: expected key=value")
        section, dot, name = key.partition(".")
        if not dot:
            if key not in DEFAULTS:
                raise UsageError(f"{key}: unknown key (known: model, residual, seq_len, model.*, residual.*)")
            top[key] = text
        elif section == "model":
            if name not in model_types or name == "name":
                raise UsageError(f"{key}: unknown field of the model config")
            model_over[name] = _coerce(key, text, model_types[name])
        elif section == "residual":
            if name not in residual_types:
                raise UsageError(f"{key}: unknown field of the residual config")
            residual_over[name] = _coerce(key, text, residual_types[name])
        else:
            raise UsageError(f"{key}: unknown key (known: model, residual, seq_len, model.*, residual.*)")
    args = {**DEFAULTS, **top}
    seq_len = args["seq_len"]
    if seq_len is not None:
        seq_len = _coerce("seq_len", seq_len, "int")
        if seq_len < 1:
            raise UsageError(f"seq_len: must be >= 1, got {seq_len}")
    return args["model"], args["residual"], model_over, residual_over, seq_len


def load_residual_config(name: str, overrides: dict | None = None) -> ResidualConfig:
    """``configs/residual/<name>.yaml`` with overrides (``residual.variant`` may be one)."""
    variant = name
    path = CONFIG_ROOT / "residual" / f"{variant}.yaml"
    if not variant or "/" in variant or not path.is_file():
        known = sorted(p.stem for p in (CONFIG_ROOT / "residual").glob("*.yaml"))
        raise UsageError(f"residual: unknown variant {variant!r}; known: {', '.join(known)}")
    values = yaml.safe_load(path.read_text()) or {}
    values.pop("defaults", None)
    values.update(overrides or {})
    return ResidualConfig(**values)


# ------------------------------------------------------------------------------------ output


def fmt_count(x: float) -> str:
    x = float(x)
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3f}{suffix}" if suffix == "B" else f"{x / scale:.2f}{suffix}"
    return f"{x:.0f}"


def fmt_flops(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {suffix}FLOP"
    return f"{x:.0f} FLOP"


def fmt_bytes(x: float) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {suffix}"
    return f"{x:.0f} B"


def render(model_name: str, model_cfg: ModelConfig, residual_cfg: ResidualConfig, seq_len: int,
           model_overridden: bool) -> str:
    from mhc_train.model.summary import (
        COMPONENTS,
        PAPER_TABLE5,
        PAPER_TABLE5_ROUNDING,
        build_meta_model,
        flops_per_token,
        parameter_table,
        residual_parameter_detail,
        residual_stream_memory,
    )

    model = build_meta_model(model_cfg, residual_cfg)
    table = parameter_table(model)
    flops = flops_per_token(model_cfg, residual_cfg, seq_len, model=model)
    mem = residual_stream_memory(model_cfg, residual_cfg, bytes_per_element=2)
    m, r = model_cfg, residual_cfg
    lines: list[str] = []
    res_desc = r.variant if r.variant == "baseline" else f"{r.variant} n={r.n}"
    if r.variant == "mhc":
        res_desc += f" t_max={r.t_max}"
    if r.variant == "hc":
        res_desc += " dynamic" if r.dynamic else " static"
    lines.append(f"model={model_name}{' (overridden)' if model_overridden else ''}  residual={res_desc}  "
                 f"seq_len={seq_len}")
    lines.append(
        f"  C={m.dim}  blocks={m.n_layers} ({m.n_sublayers} sublayers, {m.n_dense_layers} dense)  "
        f"heads={m.n_heads}  experts={m.n_routed_experts} routed (top-{m.n_activated_experts}) + "
        f"{m.n_shared_experts} shared x {m.moe_ffn_dim}  vocab={m.vocab_size}"
    )
    lines.append("")
    lines.append(f"  {'component':<18}{'total':>12}{'active':>12}")
    for c in COMPONENTS:
        row = table[c]
        lines.append(f"  {c:<18}{fmt_count(row['total']):>12}{fmt_count(row['active']):>12}")
        if c == "residual" and row["total"]:
            for leaf, count in residual_parameter_detail(model).items():
                lines.append(f"    {leaf:<24}{fmt_count(count):>10}")
    lines.append(f"  {'-' * 42}")
    total, active = table["total"]["total"], table["total"]["active"]
    lines.append(f"  {'total':<18}{fmt_count(total):>12}{fmt_count(active):>12}")
    lines.append(f"  {'exact':<18}{total:>12}{active:>12}")
    if model_name in PAPER_TABLE5:
        p_total, p_active = PAPER_TABLE5[model_name]
        lines.append(f"  {'paper Table 5':<18}{fmt_count(p_total):>12}{fmt_count(p_active):>12}"
                     + ("   (model overridden: not comparable)" if model_overridden else ""))
        if not model_overridden:
            lines.append(f"  {'relative diff':<18}{(total - p_total) / p_total:>+12.2%}"
                         f"{(active - p_active) / p_active:>+12.2%}")
            r_total, r_active = PAPER_TABLE5_ROUNDING[model_name]
            inside = ["yes" if abs(x - p) <= tol else "no"
                      for x, p, tol in ((total, p_total, r_total), (active, p_active, r_active))]
            lines.append(f"  {'within rounding':<18}{inside[0]:>12}{inside[1]:>12}"
                         "   (of the printed figures; the mHC n=4 models match)")
    lines.append("  active = one token's matmul weights: routed experts x top-k/E, embedding lookup excluded")
    lines.append("")
    lines.append(f"  FLOPs per token (seq_len={seq_len})")
    lines.append(f"    matmul          {fmt_flops(flops.matmul):>16}   (2 x active matmul weights)")
    lines.append(f"    attention       {fmt_flops(flops.attention):>16}   (QK and PV, causal context S/2)")
    lines.append(f"    connections     {fmt_flops(flops.connections):>16}   (residual / HC / mHC elementwise, Sinkhorn)")
    lines.append(f"    forward         {fmt_flops(flops.forward):>16}")
    lines.append(f"    training (3x)   {fmt_flops(flops.training):>16}")
    lines.append("")
    n, c, L, lr = mem.n, mem.dim, mem.n_sublayers, mem.recompute_block
    lines.append("  residual-stream memory per token (bf16)")
    lines.append(f"    no recompute    {fmt_bytes(mem.no_recompute_bytes):>16}   "
                 f"n*C*L = {n}*{c}*{L} = {mem.no_recompute_elements} elements")
    lines.append(f"    recompute       {fmt_bytes(mem.recompute_bytes):>16}   "
                 f"n*C*ceil(L/L_r) + (n+2)*C*L_r, L_r*={lr} (Eq 20) = {mem.recompute_elements} elements")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return
    try:
        model_name, variant, model_over, residual_over, seq_len = parse_args(argv)
        model_cfg = load_model_config(model_name, **model_over)
        residual_cfg = load_residual_config(variant, residual_over)
        if seq_len is None:
            seq_len = model_cfg.max_seq_len
        elif seq_len > model_cfg.max_seq_len:
            raise UsageError(f"seq_len: {seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        message = " ".join(str(exc).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)
    try:
        print(render(model_name, model_cfg, residual_cfg, seq_len, model_overridden=bool(model_over)))
    except BrokenPipeError:  # `mhc-train-info ... | head`: the reader left, nothing to report
        sys.stderr.close()


if __name__ == "__main__":
    main()
