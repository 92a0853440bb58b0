"""Runs as the analysis sees them: the records of a run's ``metrics.jsonl`` plus its config.

Sources (``load_runs``):

- a run directory (holding ``metrics.jsonl``), the file itself, or any directory with runs below
  it (a sweep directory such as ``runs/sweep_n``);
- ``wandb:ENTITY/PROJECT`` or ``wandb:ENTITY/PROJECT/GROUP`` (a group is an experiment name),
  read through the W&B public API when online. A run that uploaded its ``metrics.jsonl`` is read
  from that file in full; otherwise its history gives the train / val scalars only (the trainer
  logs per-layer gains and H_res to JSONL, not to W&B history).

The record format is the trainer's (``mhc_train/train/metrics.py``): one JSON object per line
with ``kind`` in run / train / val / gains / checkpoint / end and ``step``. This module reads
logs only; it never imports the trainer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

METRICS = "metrics.jsonl"
WANDB_PREFIX = "wandb:"

class AnalysisError(Exception):
    """Bad input for the analysis (no runs, no baseline, incompatible runs): one line, exit 2."""


# ------------------------------------------------------------------------------------ records


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (a run directory or the file), sorted by step. A record
    logged twice for the same (kind, step), as by a run resumed from an earlier checkpoint,
    keeps its later copy; lines cut by a crash are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    return _dedupe(_parse_lines(path.read_text(encoding="utf-8").splitlines()))


def _parse_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "kind" in rec:
            out.append(rec)
    return out


def _dedupe(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    kept: dict[tuple, dict] = {}
    for order, rec in enumerate(records):
        key = ("run", order) if rec.get("kind") == "run" else (rec.get("kind"), rec.get("step"))
        kept.pop(key, None)
        kept[key] = rec
    return sorted(kept.values(), key=lambda r: (_num(r.get("step"), 0), r.get("kind") != "run"))


def _num(value: Any, default: float = math.nan) -> float:
    """A finite float, or ``default`` (JSONL writes non-finite floats as "nan" / "inf")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value) if math.isfinite(value) else default


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Debiased exponential moving average; ``alpha`` = weight of the past (0 = no smoothing)."""
    if not 0 <= alpha < 1:
        raise AnalysisError(f"--ema must be in [0, 1), got {alpha}")
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc / (1 - alpha ** i) if alpha > 0 else v)
    return out


def get(d: dict[str, Any] | None, dotted: str, default: Any = None) -> Any:
    """``d["a"]["b"]`` for ``"a.b"``."""
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------- Run


@dataclass
class Run:
    """One training run: its records, its resolved config and where it came from."""

    name: str
    source: str  # a directory, or wandb:ENTITY/PROJECT/RUN_ID
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # the last "run" record (minus config)

    # -------------------------------------------------------------------------- identity

    @property
    def variant(self) -> str:
        return str(self.info.get("variant") or get(self.config, "residual.variant") or "unknown")

    @property
    def is_baseline(self) -> bool:
        return self.variant == "baseline"

    @property
    def n(self) -> int:
        if self.is_baseline:
            return 1
        return int(self.info.get("n") or get(self.config, "residual.n") or 1)

    @property
    def t_max(self) -> int | None:
        value = get(self.config, "residual.t_max", self.info.get("t_max"))
        return int(value) if value is not None and self.variant == "mhc" else None

    @property
    def fixed(self) -> tuple[str, ...]:
        """The mappings replaced by fixed ones (Table 1 ablation): subset of res, pre, post."""
        return tuple(m for m in ("res", "pre", "post") if get(self.config, f"residual.fix_{m}", False))

    @property
    def experiment(self) -> str:
        return str(self.info.get("experiment") or get(self.config, "experiment.name") or "")

    @property
    def model_name(self) -> str:
        return str(get(self.config, "model.name") or self.info.get("model") or "?")

    @property
    def params(self) -> int | None:
        p = self.info.get("params")
        return int(p) if isinstance(p, (int, float)) else None

    def label(self) -> str:
        """Legend text: the variant and its knobs (``mHC (n=4, t_max=20)``, ``HC (n=4, fixed pre)``)."""
        if self.is_baseline:
            return "baseline"
        name = {"hc": "HC", "mhc": "mHC"}.get(self.variant, self.variant)
        knobs = [f"n={self.n}"]
        if self.variant == "mhc":
            knobs.append(f"t_max={self.t_max}")
        if self.fixed:
            knobs.append("fixed " + "+".join(self.fixed))
        return f"{name} ({', '.join(knobs)})"

    # ----------------------------------------------------------------------------- series

    def series(self, kind: str, key: str) -> tuple[list[int], list[float]]:
        """Steps and finite values of ``key`` in the records of ``kind`` (skipped steps left out)."""
        xs, ys = [], []
        for r in self.records:
            if r.get("kind") != kind or (kind == "train" and r.get("skipped")):
                continue
            v = _num(r.get(key))
            if math.isfinite(v):
                xs.append(int(r["step"]))
                ys.append(v)
        return xs, ys

    @property
    def steps_done(self) -> int:
        xs, _ = self.series("train", "loss")
        return xs[-1] if xs else 0

    @property
    def complete(self) -> bool:
        target = get(self.config, "train.steps")
        ends = [r for r in self.records if r.get("kind") == "end"]
        if ends and ends[-1].get("status") == "complete":
            return True
        return bool(target) and self.steps_done >= int(target)

    def final_loss(self, window: float = 0.1, upto: int | None = None) -> float:
        """Mean training loss over the last ``window`` fraction of the logged steps (of those up
        to step ``upto``, to compare with a run that got less far)."""
        xs, ys = self.series("train", "loss")
        if upto is not None:
            ys = [y for x, y in zip(xs, ys) if x <= upto]
        if not ys:
            return math.nan
        k = max(1, int(round(len(ys) * window)))
        return sum(ys[-k:]) / k

    def final_val_loss(self, upto: int | None = None) -> float:
        xs, ys = self.series("val", "val_loss")
        ys = [y for x, y in zip(xs, ys) if upto is None or x <= upto]
        return ys[-1] if ys else math.nan

    def mean_step_time(self, skip: int = 5) -> float:
        """Median seconds per training step (the first ``skip`` steps, warm-up, left out)."""
        _, ys = self.series("train", "step_time_s")
        ys = sorted(ys[skip:] if len(ys) > skip else ys)
        return ys[len(ys) // 2] if ys else math.nan

    def tokens(self) -> dict[int, float]:
        """Cumulative training tokens at each logged step."""
        xs, ys = self.series("train", "tokens")
        if xs:
            return dict(zip(xs, ys))
        per_step = (get(self.config, "train.seq_len") or 0) * (get(self.config, "train.batch_size") or 0) \
            * (get(self.config, "train.grad_accum") or 1)
        steps, _ = self.series("train", "loss")
        return {s: float(s * per_step) for s in steps}

    def flops_per_token(self) -> float:
        """Training FLOPs per token: from the run record, else computed from the config."""
        value = _num(self.info.get("flops_per_token"))
        if math.isfinite(value) and value > 0:
            return value
        try:
            from mhc_train.model.config import ModelConfig
            from mhc_train.model.summary import flops_per_token
            from mhc_train.residual.config import ResidualConfig

            model = ModelConfig(**self.config["model"])
            residual = ResidualConfig(**self.config["residual"])
            return float(flops_per_token(model, residual, int(self.config["train"]["seq_len"])).training)
        except Exception as e:
            raise AnalysisError(f"{self.source}: cannot tell its FLOPs per token (no run record with "
                                f"flops_per_token, and its config gives none: {e})") from None

    # ------------------------------------------------------------------------------ gains

    def gains_steps(self) -> list[int]:
        return [int(r["step"]) for r in self.records if r.get("kind") == "gains"]

    def gains(self, step: int | None = None) -> dict[str, Any] | None:
        """The gains record at ``step`` (default: the last), with per-layer lists filled in from
        ``h_res`` when the record lacks them. None when the run logged no gains."""
        recs = [r for r in self.records if r.get("kind") == "gains"]
        if step is not None:
            recs = [r for r in recs if int(r.get("step", -1)) == step]
        if not recs:
            return None
        rec = dict(recs[-1])
        if rec.get("h_res") is not None and not all(rec.get(k) for k in GAIN_KEYS):
            rec.update(gains_from_h_res(rec["h_res"]))
        return rec


GAIN_KEYS = ("single_forward", "single_backward", "composite_forward", "composite_backward")


def gains_from_h_res(h_res: Any) -> dict[str, list[float]]:
    """Single-layer and composite Amax gains of per-layer mappings ``[L][n][n]`` (paper Figs
    3 / 7), computed by the library's ``composite_gains`` (float64 products)."""
    import torch

    from mhc_train.residual.gains import composite_gains

    h = torch.as_tensor(h_res, dtype=torch.float64)
    try:
        return composite_gains(h).as_dict()
    except ValueError as e:
        raise AnalysisError(f"h_res: {e}") from None


def composite_product(h_res: Any, first: int, last: int):
    """``H_last ... H_first`` (layers counted from 1, as in the paper's Fig 8), float64 numpy.
    The paper's prod_{i=1}^{k} H_{m+1-i} is ``composite_product(h, m - k + 1, m)``."""
    import numpy as np

    h = np.asarray(h_res, dtype=np.float64)
    if not 1 <= first <= last <= h.shape[0]:
        raise AnalysisError(f"layers {first}..{last} outside 1..{h.shape[0]}")
    acc = np.eye(h.shape[-1])
    for layer in range(first - 1, last):
        acc = h[layer] @ acc
    return acc


# ------------------------------------------------------------------------------------ loading


def _config_from_hydra(run_dir: Path) -> dict[str, Any]:
    """``.hydra/config.yaml`` of a run, resolved where it can be (older runs, crashed early)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path)
        cfg.pop("run_dir", None)  # ${hydra:...} does not resolve outside a Hydra run
        try:
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
        except Exception:
            return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]
    except Exception:
        return {}


def load_run_dir(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    records = read_metrics(run_dir)
    run_recs = [r for r in records if r.get("kind") == "run"]
    info = {k: v for k, v in run_recs[-1].items() if k != "config"} if run_recs else {}
    config = run_recs[-1].get("config") if run_recs and isinstance(run_recs[-1].get("config"), dict) else {}
    if not config:
        config = _config_from_hydra(run_dir)
    if not config and not info:
        raise AnalysisError(f"{run_dir}: its {METRICS} has no run record and there is no .hydra/config.yaml, "
                            "so its settings are unknown")
    name = str(info.get("run_name") or run_dir.name)
    return Run(name=name, source=str(run_dir), records=[r for r in records if r.get("kind") != "run"],
               config=config, info=info)


def find_run_dirs(path: str | Path) -> list[Path]:
    """Run directories at or below ``path`` (those holding metrics.jsonl), sorted."""
    p = Path(path)
    if p.is_file():
        if p.name != METRICS:
            raise AnalysisError(f"{p}: not a {METRICS} file or a run directory")
        return [p.parent]
    if not p.exists():
        text = str(path)
        looks_wandb = text.count("/") in (1, 2) and not text.startswith(("/", ".", "~"))
        hint = f" (for W&B runs write {WANDB_PREFIX}{text})" if looks_wandb else ""
        raise AnalysisError(f"{p}: no such run directory{hint}")
    if (p / METRICS).is_file():
        return [p]
    below = sorted({m.parent for m in p.rglob(METRICS) if "replaced-" not in str(m.parent.relative_to(p))})
    if not below:
        raise AnalysisError(f"{p}: no runs found ({METRICS} in it or below it)")
    return below


def load_runs(sources: Sequence[str | Path]) -> list[Run]:
    """Every run of the given sources, each once, in the order found."""
    if not sources:
        raise AnalysisError("no runs given")
    runs: list[Run] = []
    seen: set[str] = set()
    for src in sources:
        s = str(src)
        if s.startswith(WANDB_PREFIX):
            found = load_wandb(s[len(WANDB_PREFIX):])
        else:
            found = [load_run_dir(d) for d in find_run_dirs(s)]
        for run in found:
            key = run.source if run.source.startswith(WANDB_PREFIX) else str(Path(run.source).resolve())
            if key not in seen:
                seen.add(key)
                runs.append(run)
    with_steps = [r for r in runs if r.series("train", "loss")[0]]
    if not with_steps:
        raise AnalysisError(f"no training records in the {len(runs)} run(s) found in {', '.join(map(str, sources))}")
    return with_steps


# -------------------------------------------------------------------------------------- W&B


def _wandb_offline_reason() -> str | None:
    """Why W&B cannot be read from here (None: try). Never touches the network."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun", "disabled"):
        return f"WANDB_MODE={mode}; reading runs from W&B needs online mode"
    if os.environ.get("WANDB_API_KEY"):
        return None
    try:
        import netrc
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        if os.path.isfile(path) and netrc.netrc(path).authenticators(host):
            return None
    except Exception:
        pass
    return "no W&B API key (run `wandb login` or set WANDB_API_KEY)"


def _records_from_history(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """train/val records from W&B history rows (keys ``train/loss``, ``val/val_loss``, ...)."""
    out: list[dict[str, Any]] = []
    for row in rows:
        step = row.get("_step")
        if step is None:
            continue
        by_kind: dict[str, dict[str, Any]] = {}
        for key, value in row.items():
            if "/" not in key or key.startswith("_"):
                continue
            kind, name = key.split("/", 1)
            if kind in ("train", "val"):
                by_kind.setdefault(kind, {"kind": kind, "step": int(step)})[name] = value
        out.extend(by_kind.values())
    return out


def load_wandb(spec: str, *, timeout: float = 30.0) -> list[Run]:
    """Runs of ``ENTITY/PROJECT[/GROUP]`` from the W&B public API."""
    parts = [p for p in spec.split("/") if p]
    if len(parts) not in (2, 3):
        raise AnalysisError(f"{WANDB_PREFIX}{spec}: expected {WANDB_PREFIX}ENTITY/PROJECT or "
                            f"{WANDB_PREFIX}ENTITY/PROJECT/GROUP")
    reason = _wandb_offline_reason()
    if reason:
        raise AnalysisError(f"{WANDB_PREFIX}{spec}: {reason}; or pass the local run directories "
                            f"(runs/<experiment>), which hold the same metrics")
    try:
        import tempfile

        import wandb

        api = wandb.Api(timeout=int(timeout))
        filters = {"group": parts[2]} if len(parts) == 3 else None
        wb_runs = list(api.runs(f"{parts[0]}/{parts[1]}", filters=filters))
        runs = []
        for wr in wb_runs:
            records = None
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    f = wr.file(METRICS).download(root=tmp, replace=True)
                    f.close()
                    records = read_metrics(Path(tmp) / METRICS)
            except Exception:
                records = None
            config = dict(wr.config or {})
            info: dict[str, Any] = {}
            if records is not None:
                run_recs = [r for r in records if r.get("kind") == "run"]
                if run_recs:
                    info = {k: v for k, v in run_recs[-1].items() if k != "config"}
                    config = run_recs[-1].get("config") or config
                records = [r for r in records if r.get("kind") != "run"]
            else:
                records = _dedupe(_records_from_history(wr.scan_history()))
            info.setdefault("experiment", wr.group or get(config, "experiment.name"))
            runs.append(Run(name=wr.name, source=f"{WANDB_PREFIX}{parts[0]}/{parts[1]}/{wr.id}",
                            records=records, config=config, info=info))
    except AnalysisError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AnalysisError(f"{WANDB_PREFIX}{spec}: W&B API failed: {first}") from None
    if not runs:
        raise AnalysisError(f"{WANDB_PREFIX}{spec}: no runs found")
    return runs
