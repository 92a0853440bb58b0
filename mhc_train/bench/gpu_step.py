"""GPU check, step time: forward + backward of a small-depth model at the check's widths (the
3B widths with 2 blocks on a GPU), side by side in one process:

- residuals: baseline, HC, mHC with the torch backend, mHC with the Triton backend;
- eager, and compiled: ``torch.compile`` of each block (``model.blocks[i]``, as torchtitan
  compiles), the embedding, stream expansion and contraction, head and loss staying eager. A
  compile that fails or does not finish in time is recorded for its configuration, not raised;
- bf16 autocast over fp32 weights, as the trainer runs on a GPU; no optimizer step (it does not
  depend on the residual);
- interleaved rounds: every configuration once per round, the order reversed every other round,
  so that drifting clocks hit all alike;
- fp32 matmuls as the trainer runs them (TF32 on CUDA, ``gpu_kernels.training_precision``);
- memory: the peak allocated during a timed step above what was allocated before it (activations,
  gradients, temporaries), beside the model's own parameters; the warm-up steps (compiles,
  autotuning) do not count.

The models are built once per residual (weights drawn per name, so the blocks of all three get
the same values) and copied for the other backend and for compiling.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from mhc_train.bench.gpu_budget import SectionTimeout, hard_cap
from mhc_train.bench.gpu_kernels import training_precision
from mhc_train.bench.gpu_report import one_line
from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.residual import ResidualConfig

RESIDUALS = (("baseline", None), ("hc", None), ("mhc", "torch"), ("mhc", "triton"))
# Compiled configurations (those of ``Shapes.compile_residuals``) are warmed up in this order:
# the headline ratio first, in case time runs out.
COMPILE_ORDER = (("mhc", "triton"), ("baseline", None), ("mhc", "torch"), ("hc", None))


@dataclass
class StepConfig:
    variant: str
    backend: str | None
    mode: str  # eager | compile
    model: nn.Module | None = None
    error: str | None = None
    warmup_s: float | None = None
    step_s: float | None = None  # the last warm-up step
    loss: float | None = None
    graph_breaks: int | None = None
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None

    @property
    def name(self) -> str:
        return self.variant + (f"/{self.backend}" if self.backend else "") + f" {self.mode}"


def set_backend(model: nn.Module, backend: str) -> None:
    """Point every residual config held by ``model`` (a private copy) at ``backend``."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, ResidualConfig):
                value.backend = backend


def compile_blocks(model: nn.Module, backend: str) -> None:
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, backend=backend, dynamic=False)


def graph_breaks() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return sum(counters["graph_break"].values())
    except Exception:  # counters are internal: their absence only loses the figure
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(config: StepConfig, tokens: torch.Tensor, dtype: torch.dtype) -> float:
    """One forward + backward: its seconds; its memory peak and loss go into ``config``."""
    model, device = config.model, tokens.device
    model.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    if cuda:
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype):
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
    loss.backward()
    _sync(device)
    seconds = time.perf_counter() - start
    if cuda:
        config.peak_bytes = max(config.peak_bytes or 0, torch.cuda.max_memory_allocated(device) - before)
    config.loss = float(loss.detach())
    model.zero_grad(set_to_none=True)  # the other configurations' steps must not carry these gradients
    return seconds


def build(check, cfg) -> list[StepConfig]:
    s, device = check.shapes, check.device
    built = {}
    for variant in ("baseline", "hc", "mhc"):
        start = time.perf_counter()
        torch.manual_seed(0)
        rcfg = ResidualConfig(variant=variant, n=s.n, t_max=s.t_max, backend="torch")
        built[variant] = MHCTransformer(cfg, rcfg).to(device).train()
        check.say(f"step: built {variant} in {time.perf_counter() - start:.1f} s")
    configs = []
    for mode in ("eager", "compile"):
        for variant, backend in RESIDUALS:
            if mode == "compile" and (variant, backend) not in s.compile_residuals:
                continue
            model = built[variant]
            if backend == "triton" or mode == "compile":
                model = copy.deepcopy(model)
                if backend:
                    set_backend(model, backend)
            configs.append(StepConfig(variant, backend, mode, model))
    return configs


def warm_up(check, config: StepConfig, tokens: torch.Tensor, seconds: float) -> None:
    """Compile (compiled configurations) and run the warm-up steps within ``seconds``; a failure
    or running out of time is recorded in ``config``, which then takes no part in the timing."""
    s = check.shapes
    breaks = graph_breaks()
    start = time.perf_counter()
    verb = "compile and first steps" if config.mode == "compile" else "warm-up steps"
    if seconds < 1:
        config.error, config.model = f"{verb} not started: no time left in the section's cap", None
    else:
        try:
            with hard_cap(seconds) as cap:
                if config.mode == "compile":
                    compile_blocks(config.model, s.compile_backend)
                for _ in range(max(1, s.warmup)):
                    config.step_s = timed_step(config, tokens, s.autocast_dtype)
        except (Exception, SectionTimeout) as exc:
            if isinstance(exc, SectionTimeout) and not cap.owns(exc):
                raise  # the section's own cap: it ends here
            config.error, config.model = f"{verb} did not finish: {one_line(exc)}", None
    config.warmup_s = time.perf_counter() - start
    config.peak_bytes = None  # the warm-up's peaks hold compile and autotune allocations: not a step's
    if config.mode == "compile" and breaks is not None:
        config.graph_breaks = graph_breaks() - breaks
    status = config.error or f"loss {config.loss:.4f}"
    check.say(f"step: warm-up {config.name}: {config.warmup_s:.1f} s, {status}")


def interleaved_rounds(configs: list[StepConfig], tokens: torch.Tensor, repeats: int, dtype: torch.dtype) -> None:
    """Time every warmed-up configuration once per round. A configuration that fails drops out
    with its error; at the section's cap the rounds stop and what was timed stands."""
    timed = [c for c in configs if c.model is not None]
    for r in range(repeats):
        for config in (timed if r % 2 == 0 else timed[::-1]):
            if config.model is None:
                continue
            try:
                config.times.append(timed_step(config, tokens, dtype))
            except SectionTimeout:
                for c in timed:
                    c.error = c.error or f"timed in {len(c.times)} of {repeats} rounds: the section's cap came first"
                return
            except Exception as exc:
                config.error, config.model, config.times = f"timing failed: {one_line(exc)}", None, []


def run_step_times(check) -> dict:
    with training_precision(check.device):
        return _step_times(check)


def _step_times(check) -> dict:
    import torch._dynamo  # not at import: it takes seconds, and the no-GPU path needs none of it

    s, device, allowance = check.shapes, check.device, check.allowance
    cfg = load_model_config(s.step_model, **s.step_overrides)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (s.step_batch, s.step_seq + 1), generator=gen).to(device)
    configs = build(check, cfg)
    params = {c.name: sum(p.numel() * p.element_size() for p in c.model.parameters()) for c in configs}
    compiled = {(c.variant, c.backend): c for c in configs if c.mode == "compile"}
    with torch._dynamo.config.patch(cache_size_limit=64):  # one cache entry per block instance
        for config in configs:
            if config.mode == "eager":
                warm_up(check, config, tokens, allowance.cap_s - allowance.used())
        # Keep time for the rounds: least_repeats of every configuration at twice the eager steps.
        eager_round = sum(c.step_s for c in configs if c.mode == "eager" and c.step_s)
        reserve = s.least_repeats * 4 * eager_round + 5.0
        for key in (k for k in COMPILE_ORDER if k in compiled):
            warm_up(check, compiled[key], tokens, allowance.cap_s - allowance.used() - reserve)
        timed = [c for c in configs if c.model is not None]
        per_round = sum(c.step_s for c in timed)
        repeats = allowance.repeats(per_round, 1, most=s.most_repeats, least=s.least_repeats)
        check.say(f"step: {repeats} interleaved rounds of {len(timed)} configurations ({per_round:.2f} s each)")
        interleaved_rounds(configs, tokens, repeats, s.autocast_dtype)
    for c in configs:
        c.model = None  # free the weights before the next section
    return report(check, cfg, configs, params, repeats)


def report(check, cfg, configs: list[StepConfig], params: dict, repeats: int) -> dict:
    s = check.shapes
    tokens = s.step_batch * s.step_seq
    median = {c.name: statistics.median(c.times) for c in configs if c.times}
    rows = []
    for c in configs:
        base = median.get(f"baseline {c.mode}")
        med = median.get(c.name)
        rows.append({
            "variant": c.variant, "backend": c.backend or "-", "mode": c.mode, "status": c.error or "ok",
            "median_ms": med * 1e3 if med else None, "min_ms": min(c.times) * 1e3 if c.times else None,
            "tokens_per_s": tokens / med if med else None, "vs_baseline": med / base if med and base else None,
            "warmup_s": c.warmup_s, "peak_step_GiB": c.peak_bytes / 2**30 if c.peak_bytes is not None else None,
            "params_GiB": params[c.name] / 2**30, "graph_breaks": c.graph_breaks, "loss": c.loss})
    summary = [f"model {s.step_model} widths with {s.step_overrides} (dim {cfg.dim}, vocab {cfg.vocab_size}), "
               f"{s.step_batch} x {s.step_seq} tokens per step, {str(s.autocast_dtype).removeprefix('torch.')} "
               f"autocast, n = {s.n}, t_max = {s.t_max}; {repeats} interleaved rounds, median",
               f"compile = torch.compile(backend={s.compile_backend!r}) of each block; embedding, head and loss "
               f"eager; peak = the step's peak allocation above what was allocated before it"]
    for mode in ("eager", "compile"):
        ratios = [f"{r['variant']}{'/' + r['backend'] if r['backend'] != '-' else ''} {r['vs_baseline']:.3f}x"
                  for r in rows if r["mode"] == mode and r["variant"] != "baseline" and r["vs_baseline"]]
        if ratios:
            summary.append(f"overhead over the baseline, {mode}: " + ", ".join(ratios)
                           + " (paper: mHC 1.067x at n = 4, whole 27B model, its own kernels)")
    summary.append(f"the embedding, the {cfg.vocab_size}-token head and the loss are a larger share of a "
                   f"{cfg.n_layers}-block step than of the full model's, which lowers every ratio here")
    failed = [r for r in rows if r["status"] != "ok" or r["loss"] is None or not math.isfinite(r["loss"])]
    return {"passed": not failed, "rows": rows, "summary": summary}
