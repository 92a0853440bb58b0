"""The training loop. One step, top to bottom (``Trainer._train_step``):

    forward + backward of grad_accum micro-batches   (the layout: model, DDP, FSDP, DeepSpeed
                                                      engine, or the pipeline schedule)
    router loads <- summed over ranks (the imbalance metric; mhc_train/train/router_balance.py)
    grad_norm, clipped to train.grad_clip                   (or just the norm when off)
    finite loss and grad norm?  optimizer step (its post-hook: the router-bias update)
                      else      skip the update (counted), discard the loads; stop after max_consecutive_skips
    zero_grad; lr_scheduler.step(); step += 1
    then, when due: validation loss, Amax gains + H_res figures, checkpoint

What differs between parallel layouts lives in ``mhc_train.train.layouts``.

Resuming (``resume=auto``) restores model, optimizer, scheduler, data position and RNG, so the
losses after a resume equal those of an uninterrupted run bit for bit on CPU. It takes the newest
checkpoint that verifies (checksums) and loads (finite tensors); each one skipped is named in the
log, and when none is usable the run stops (exit 2) rather than start again from step 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mhc_train import analysis as plot
from mhc_train.data import DataError, PackedLoader, PackedTokens, ValidationLoader, check_vocab, ensure_bundled_dataset, read_meta
from mhc_train.data.bundled import default_cache_dir
from mhc_train.model import MHCTransformer
from mhc_train.weight_casts import step_region
from mhc_train.train.checkpoint import (
    STATE,
    CheckpointManager,
    check_compatible,
    load_checkpoint,
    read_checkpoint_meta,
    resume_candidates,
    rng_state,
    set_rng_state,
    verify,
)
from mhc_train.train.compile import settle_backend
from mhc_train.train.config import RunConfig, fingerprint, shape_signature
from mhc_train.train.errors import CheckpointError, CheckpointUnusable, ConfigError, Interrupted, TrainingStopped
from mhc_train.train.fault_injection import nonfinite_step
from mhc_train.train.layouts import make_layout
from mhc_train.train.metrics import JsonlSink, Metrics, ProgressBar, WandbSink
from mhc_train.train.optim import build_optimizer, implementation
from mhc_train.train.router_balance import RouterBalance
from mhc_train.train.schedule import build_scheduler

log = logging.getLogger("mhc_train.train")

# Dense bf16 peak of one device, for MFU (vendor datasheets, SXM parts).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12}


def data_path(cfg: RunConfig) -> Path:
    """The prepared directory to train on (building the bundled one on first use)."""
    d = cfg.data
    if d.source == "prepared":
        return Path(d.path).expanduser()
    cache = Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir(d.vocab_size)
    if not cache.exists():
        log.info("preparing the bundled Shakespeare dataset (vocab %d) in %s (first use only)", d.vocab_size, cache)
    return ensure_bundled_dataset(cache, vocab_size=d.vocab_size)


def check_data(cfg: RunConfig, path: Path) -> dict:
    """The prepared directory exists, has the splits and ids that fit the model (ConfigError)."""
    try:
        meta = read_meta(path)
    except DataError as e:
        raise ConfigError(f"data.path: {e}") from None
    try:
        check_vocab(meta, cfg.model.vocab_size)
    except DataError as e:
        raise ConfigError(f"model.vocab_size: {e} (tokenizer of {path})") from None
    for key, split in (("data.train_split", cfg.data.train_split), ("data.val_split", cfg.data.val_split)):
        if split not in meta["splits"]:
            raise ConfigError(f"{key}: {path} has no {split!r} split (has {sorted(meta['splits'])})")
        # The shards themselves: sizes against meta.json, a scan for ids beyond the vocabulary, and
        # enough tokens for one batch (DataError, named by file; the world's batch is checked later).
        tokens = PackedTokens(path, split, cfg.train.seq_len)
        if tokens.num_sequences < cfg.train.batch_size:
            raise tokens.too_small(cfg.train.batch_size, f"train.batch_size {cfg.train.batch_size}")
    return meta


def deterministic(t, device: torch.device) -> bool:
    """train.deterministic, or by default: on for CPU (runs bitwise reproducible, nothing lost),
    off for CUDA (deterministic kernels and cuBLAS workspaces cost speed on a GPU)."""
    return t.deterministic if t.deterministic is not None else device.type != "cuda"


def apply_matmul_precision(setting: str, device: torch.device) -> None:
    """train.matmul_precision on CUDA (TF32 for fp32 matmuls, cuBLAS and Triton's tl.dot alike);
    on a CPU nothing changes, so CPU runs keep their bitwise reproducibility."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision(setting)


def flops_per_token(cfg: RunConfig, model: torch.nn.Module) -> float:
    """Training FLOPs per token (forward + backward)."""
    try:
        from mhc_train.model.summary import flops_per_token as summary_flops

        return float(summary_flops(cfg.model, cfg.residual, cfg.train.seq_len).training)
    except Exception:  # fallback: 6 x active parameters + causal attention
        m = cfg.model
        routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        active = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed."))
        active -= routed * (1 - m.n_activated_experts / m.n_routed_experts)
        attention = m.n_layers * 2 * m.n_heads * (m.qk_head_dim + m.v_head_dim) * cfg.train.seq_len / 2
        return 6.0 * active + 3.0 * attention


def peak_flops(cfg: RunConfig, device: torch.device) -> float | None:
    if cfg.train.peak_flops:
        return float(cfg.train.peak_flops)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, config_dict: dict[str, Any]):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.config_dict = config_dict  # resolved, for checkpoints, JSONL and W&B
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self.is_main = self.rank == 0
        self.step = 0
        self.tokens_seen = 0
        self.skips_total = 0
        self.consecutive_skips = 0
        self.elapsed_s = 0.0  # training wall time over all resumed segments
        self.wandb_id: str | None = None
        self._stop_signal: int | None = None
        self.handling_signals = False
        self.metrics = Metrics([])
        self.ckpts: CheckpointManager | None = None
        self._skipped: list[str] = []  # checkpoints resume could not use: "step_0000004: reason"
        self._ema_loss: float | None = None
        self.last_val: float | None = None

    # ------------------------------------------------------------------------------ set-up

    def _device(self) -> torch.device:
        want = self.cfg.train.device
        if want == "auto":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
                else torch.device("cpu")
        device = torch.device(want)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"train.device: {want} requested, but CUDA is not available")
        return device

    def _use_bf16(self, device: torch.device) -> bool:
        p = self.cfg.train.precision
        if p == "auto":
            return device.type == "cuda" and torch.cuda.is_bf16_supported()
        return p == "bf16"

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return step_region(self.device.type, torch.bfloat16)  # autocast + the experts' weight copies

    def _resume_candidates(self, ckpts: CheckpointManager) -> list[Path]:
        resume = self.cfg.resume
        if resume == "none":
            self._move_aside_previous()
            return []
        if resume == "auto":
            return ckpts.candidates()
        return resume_candidates(Path(resume))

    def _verified(self, candidates: list[Path]):
        """The candidates whose files match their checksums, newest first (collective)."""
        for path in candidates:
            problem = verify(path)
            if problem is None:
                yield path
            else:
                self._skip(path, problem)

    def _next_source(self, verified) -> Path | None:
        """The next verified checkpoint; one that does not fit this run stops it (CheckpointError)."""
        source = next(verified, None)
        if source is not None:
            cfg = self.cfg
            changed = check_compatible(source, read_checkpoint_meta(source),
                                       shape_signature(cfg.model, cfg.residual), self.config_dict)
            if changed:
                shown = "; ".join(changed[:6]) + (f"; ... ({len(changed) - 6} more)" if len(changed) > 6 else "")
                log.warning("resuming %s with changed settings: %s", source, shown)
        return source

    def _skip(self, path: Path, problem: str) -> None:
        self._skipped.append(f"{path.name}: {problem}")
        if self.is_main:
            log.warning("skipping checkpoint %s: %s", path, problem)

    def _none_usable(self, candidates: list[Path]) -> CheckpointError:
        more = len(self._skipped) - 3
        shown = "; ".join(self._skipped[:3]) + (f"; ... ({more} more)" if more > 0 else "")
        return CheckpointError(
            f"no usable checkpoint in {candidates[0].parent} ({shown}); nothing was changed. Start fresh "
            f"with resume=none (earlier outputs are moved aside), or resume=PATH from another checkpoint")

    def _move_aside_previous(self) -> None:
        """resume=none in a used run directory: keep the old outputs, out of the way."""
        old = [self.run_dir / n for n in ("metrics.jsonl", "checkpoints", "figures")]
        old = [p for p in old if p.exists()]
        if not old or not self.is_main:
            return
        aside = self.run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(parents=True, exist_ok=True)
        for p in old:
            shutil.move(str(p), str(aside / p.name))
        log.info("resume=none: earlier outputs moved to %s", aside)

    def _meta(self) -> dict[str, Any]:
        signature = shape_signature(self.cfg.model, self.cfg.residual)
        return {"signature": signature, "fingerprint": fingerprint(signature), "config": self.config_dict,
                "config_fingerprint": fingerprint(self.config_dict), "torch": torch.__version__,
                "run_name": self.cfg.run_name, "experiment": self.cfg.experiment.name}

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skips_total": self.skips_total,
                "consecutive_skips": self.consecutive_skips, "elapsed_s": self.elapsed_s,
                "scheduler": self.scheduler.state_dict(), "data": self.train_loader.state_dict(),
                "rng": rng_state(), "wandb_id": self.wandb_id, "ema_loss": self._ema_loss}

    def _restore_first_loadable(self, source: Path | None, verified, candidates: list[Path]) -> Path | None:
        """Load ``source``, or when that fails the next verified checkpoint (which overwrites
        whatever the failed load wrote); None: a fresh start."""
        while source is not None:
            try:
                self._restore(source)
            except CheckpointUnusable as e:
                self._skip(source, str(e).removeprefix(f"{source}: "))
                source = self._next_source(verified)
                continue
            self.ckpts.last_good = source
            log.info("resumed from %s at step %d", source, self.step)
            return source
        if candidates:
            raise self._none_usable(candidates)
        return None

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, self.layout)
        try:
            self._restore_trainer_state(path, state)
        except (KeyError, TypeError, ValueError, IndexError) as e:  # a trainer_state.json of the wrong shape
            raise CheckpointUnusable(f"{path}: {STATE} has a missing or bad entry "
                                     f"({type(e).__name__}: {e})") from None

    def _restore_trainer_state(self, path: Path, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        # The loaded optimizer and scheduler carry the hyper-parameters of the run that saved them;
        # this run's config wins (a changed lr, eps or weight decay is warned about, not ignored).
        o, groups = self.cfg.optim, self.optimizer.param_groups
        for i, group in enumerate(groups):
            group.update(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay if i == 0 else 0.0,
                         initial_lr=self.cfg.lr)
        # The implementation is this run's too: a CPU checkpoint resumed on CUDA gets fused AdamW,
        # a CUDA one resumed on CPU the bitwise-reproducible foreach path.
        chosen = implementation(p for group in groups for p in group["params"])
        for group in groups:
            group.update(fused=chosen.get("fused"), foreach=chosen.get("foreach"))
        self.scheduler.base_lrs = [self.cfg.lr] * len(groups)
        lrs = [base * fn(self.scheduler.last_epoch) for base, fn in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        data_state = dict(state["data"])
        here = (self.cfg.train.batch_size, self.layout.dp_world_size)
        saved = (data_state.get("batch_size", 0), data_state.get("world_size", 0))
        if saved != here and saved[0] * saved[1] == here[0] * here[1]:
            # Another data-parallel size with the same global batch: rank r takes the entries
            # r, r + W, ... of one shuffled order, so batch i of all ranks together is the same
            # set of sequences for every W and the position (epoch, index) means the same.
            data_state.update(batch_size=here[0], world_size=here[1])
            log.info("resuming data position with %d rank(s) x batch %d (saved with %d x %d)",
                     here[1], here[0], saved[1], saved[0])
        try:
            self.train_loader.load_state_dict(data_state)
        except DataError as e:
            raise CheckpointError(f"{path}: {e}") from None
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.skips_total = int(state["skips_total"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.wandb_id = state.get("wandb_id")
        self._ema_loss = state.get("ema_loss")

    def _open_sinks(self, resumed: bool) -> None:
        if not self.is_main:
            return
        lcfg = self.cfg.logging
        sinks: list = [JsonlSink(self.run_dir / "metrics.jsonl", keep_until_step=self.step)]
        if lcfg.wandb.enabled:
            if not self.wandb_id:  # kept in checkpoints: a resumed run continues the same W&B run
                self.wandb_id = secrets.token_hex(4)
            w = lcfg.wandb
            sinks.append(WandbSink(
                project=w.project, entity=w.entity, name=w.name or self.cfg.run_name,
                group=w.group or self.cfg.experiment.name, tags=list(w.tags), config=self.config_dict,
                run_dir=self.run_dir, mode=w.mode, init_timeout=w.init_timeout, run_id=self.wandb_id,
                resume=resumed, wandb_dir=w.dir))
        sinks.append(ProgressBar(self.cfg.train.steps, self.step, self.cfg.run_name, lcfg.progress))
        self.metrics = Metrics(sinks)

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                signal.signal(signum, previous.get(signum, signal.SIG_DFL))
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning("%s received: stopping after this step (checkpoint first); send again to abort",
                        signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            previous[sig] = signal.signal(sig, handler)
        return previous

    # -------------------------------------------------------------------------------- run

    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        saved_threads = torch.get_num_threads()
        saved_det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        saved_precision = torch.get_float32_matmul_precision()
        previous_handlers: dict = {}
        status, exit_code = "failed", 1
        try:
            if t.threads:
                torch.set_num_threads(t.threads)
            self.device = self._device()
            self.bf16 = self._use_bf16(self.device)
            apply_matmul_precision(t.matmul_precision, self.device)
            if deterministic(t, self.device):
                if self.device.type == "cuda":
                    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                    torch.backends.cudnn.benchmark = False
                torch.use_deterministic_algorithms(True, warn_only=True)

            # The checkpoint to resume from, verified and compatible, before anything is built
            # (the bundled dataset included): a mismatched checkpoint is refused at once.
            self.ckpts = ckpts = CheckpointManager(self.run_dir / "checkpoints", t.keep_checkpoints, self.rank)
            candidates = self._resume_candidates(ckpts)
            verified = self._verified(candidates)
            source = self._next_source(verified)
            if candidates and source is None:
                raise self._none_usable(candidates)
            ckpts.remove_partial()

            # Several ranks: rank 0 prepares the bundled dataset on first use, the others wait for it.
            first_use_guard = self.world_size > 1 and dist.is_initialized()
            if first_use_guard and not self.is_main:
                dist.barrier()
            path = data_path(cfg)
            if first_use_guard and self.is_main:
                dist.barrier()
            check_data(cfg, path)

            torch.manual_seed(t.seed)
            np.random.seed(t.seed % 2**32)
            random.seed(t.seed)
            with torch.device("meta"):  # no memory yet: the layout materialises what this rank holds
                self.model = MHCTransformer(cfg.model, cfg.residual)
            self.layout = make_layout(self.model, self.device, cfg, self.bf16)
            self.layout.prepare()  # before the optimizer: FSDP replaces the parameters, a pipeline cuts stages
            if t.compile:
                settle_backend(cfg, self.device)  # auto's self-test runs eagerly, not inside a trace
            self.optimizer = build_optimizer(self.layout.optimized_module, lr=cfg.lr, betas=cfg.optim.betas,
                                             eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                             decay_embeddings=cfg.optim.decay_embeddings)
            self.layout.attach(self.optimizer)
            self.balance = RouterBalance(self.model, self.layout, self.optimizer)
            o = cfg.optim
            self.scheduler = build_scheduler(self.optimizer, total_steps=t.steps, warmup_steps=o.warmup_steps,
                                             schedule=o.schedule, decay_at=o.decay_at, decay_factors=o.decay_factors)
            self.train_loader = PackedLoader(path, seq_len=t.seq_len, batch_size=t.batch_size,
                                             split=cfg.data.train_split, seed=t.seed, rank=self.layout.dp_rank,
                                             world_size=self.layout.dp_world_size,
                                             document_mask=cfg.data.document_mask)
            self.val_loader = ValidationLoader(path, seq_len=t.seq_len, batch_size=t.batch_size,
                                               max_batches=t.eval_batches, split=cfg.data.val_split,
                                               rank=self.layout.dp_rank, world_size=self.layout.dp_world_size,
                                               document_mask=cfg.data.document_mask)
            self.gain_batch = tuple(x.to(self.device) for x in next(iter(self.val_loader)))
            source = self._restore_first_loadable(source, verified, candidates)
            if self.step >= t.steps:
                log.info("run %s is already complete (step %d of %d); nothing to do "
                         "(resume=none starts it again)", self.run_dir, self.step, t.steps)
                return {"status": "complete", "step": self.step, "exit_code": 0}
            self.flops_per_token = flops_per_token(cfg, self.model)
            self.peak = peak_flops(cfg, self.device)

            self._open_sinks(resumed=source is not None)
            n_params = sum(p.numel() for p in self.model.parameters())
            self.metrics.log({
                "kind": "run", "step": self.step, "run_name": cfg.run_name, "experiment": cfg.experiment.name,
                "run_dir": str(self.run_dir), "variant": cfg.residual.variant, "n": cfg.residual.streams,
                "t_max": cfg.residual.t_max, "model": cfg.model.name, "params": n_params,
                "flops_per_token": self.flops_per_token, "lr": cfg.lr, "device": str(self.device),
                "precision": "bf16" if self.bf16 else "fp32", "torch": torch.__version__,
                "resumed_from": str(source) if source else None, "data": str(path), "config": self.config_dict})
            log.info("training %s (%s, %.2fM parameters) on %s, %s, %d steps of %d tokens; run dir %s",
                     cfg.run_name, cfg.residual.variant, n_params / 1e6, self.device,
                     "bf16 autocast" if self.bf16 else "fp32", t.steps, self._tokens_per_step(), self.run_dir)

            previous_handlers = self._install_signal_handlers()
            self.handling_signals = bool(previous_handlers)  # a first Ctrl-C now asks to stop after a step
            redirect = contextlib.nullcontext()
            if cfg.logging.progress and self.is_main:  # log lines above the progress bar, not through it
                from tqdm.contrib.logging import logging_redirect_tqdm

                redirect = logging_redirect_tqdm()
            with redirect:
                status = self._loop(ckpts)
            exit_code = 0
            return {"status": status, "step": self.step, "exit_code": 0, "loss": self._ema_loss,
                    "val_loss": self.last_val, "elapsed_s": self.elapsed_s}
        except Interrupted as e:
            status, exit_code = "interrupted", e.exit_code
            raise
        except TrainingStopped as e:
            status, exit_code = "stopped", e.exit_code
            raise
        finally:
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
            if self.metrics.sinks:
                self.metrics.log({"kind": "end", "step": self.step, "status": status, "tokens": self.tokens_seen,
                                  "skips_total": self.skips_total, "elapsed_s": round(self.elapsed_s, 3),
                                  "loss_ema": self._ema_loss, "val_loss": self.last_val})
            self.metrics.close(exit_code)
            torch.set_num_threads(saved_threads)
            torch.use_deterministic_algorithms(saved_det[0], warn_only=saved_det[1])
            torch.set_float32_matmul_precision(saved_precision)

    def _agree_on_stop_signal(self) -> None:
        """Several ranks: a signal seen by any rank stops all of them after the same step (the
        checkpoint is collective; ranks deciding at different steps would hang in it)."""
        if self.world_size <= 1 or not dist.is_initialized():
            return
        flag = torch.tensor([float(self._stop_signal or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(flag.item())

    def _tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.seq_len * t.grad_accum * self.layout.dp_world_size

    def _loop(self, ckpts: CheckpointManager) -> str:
        """Train to train.steps ("complete") or to train.stop_at ("paused")."""
        t = self.cfg.train
        while self.step < t.steps:
            record = self._train_step()
            self._agree_on_stop_signal()
            s = self.step
            if s % self.cfg.logging.log_every == 0 or s == t.steps or record["skipped"]:
                self.metrics.log(record)
            if self.consecutive_skips >= t.max_consecutive_skips:
                last = ckpts.last_good
                raise TrainingStopped(
                    f"{self.consecutive_skips} consecutive non-finite updates (steps "
                    f"{s - self.consecutive_skips + 1}-{s}, last: {record['skip_reason']}); "
                    f"last good checkpoint: {last if last else 'none'}")
            final = s == t.steps
            if t.eval_every and (s % t.eval_every == 0 or final):
                self._validate()
            if t.gains_every and (s % t.gains_every == 0 or final):
                self._gains()
            stop_here = t.stop_at is not None and s >= t.stop_at
            if final or stop_here or self._stop_signal is not None or (t.checkpoint_every and s % t.checkpoint_every == 0):
                self._checkpoint(ckpts)
            if final or stop_here or self._stop_signal is not None:
                if self.is_main and self.cfg.logging.plots:
                    plot.plot_run(self.run_dir)
            if self._stop_signal is not None:
                name = signal.Signals(self._stop_signal).name
                raise Interrupted(f"{name} at step {s}; checkpoint saved in {ckpts.last_good}; "
                                  f"run the same command again to continue", self._stop_signal)
            if stop_here and not final:
                log.info("stopping at step %d (train.stop_at); the same command continues the run", s)
                return "paused"
        log.info("done: %d steps, %.1f s of training, loss %.4f (EMA)%s; %s", self.step, self.elapsed_s,
                 self._ema_loss or float("nan"),
                 f", validation loss {self.last_val:.4f}" if self.last_val is not None else "", self.run_dir)
        return "complete"

    def _train_step(self) -> dict[str, Any]:
        t = self.cfg.train
        model, layout = self.model, self.layout
        model.train()
        t0 = time.perf_counter()
        batches = [tuple(x.to(self.device, non_blocking=True) for x in next(self.train_loader))
                   for _ in range(t.grad_accum)]
        with nonfinite_step((self.step + 1) in t.inject_nonfinite_at):
            loss_v, ce_v, aux_v = (float(x) for x in layout.forward_backward(batches, self.autocast))
        balance = self.balance.loads()  # summed over the ranks, before the update uses them
        lr = self.optimizer.param_groups[0]["lr"]
        grad_v, applied = layout.update(t.grad_clip, allowed=math.isfinite(loss_v))  # its hook: router biases
        skip_reason = None
        if applied:
            self.balance.check_updated()
            self.consecutive_skips = 0
        else:
            skip_reason = "non-finite loss" if not math.isfinite(loss_v) else "non-finite grad norm"
            self.balance.discard()
            self.skips_total += 1
            self.consecutive_skips += 1
            log.warning("step %d: %s, update skipped (%d in a row, %d in total)", self.step + 1, skip_reason,
                        self.consecutive_skips, self.skips_total)
        layout.zero_grad()
        self.scheduler.step()
        self.step += 1
        tokens = self._tokens_per_step()
        self.tokens_seen += tokens
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.elapsed_s += dt
        if skip_reason is None:
            self._ema_loss = loss_v if self._ema_loss is None else 0.9 * self._ema_loss + 0.1 * loss_v
        record = {
            "kind": "train", "step": self.step, "loss": loss_v, "ce_loss": ce_v,
            "aux_loss": aux_v, "grad_norm": grad_v, "lr": lr, "tokens": self.tokens_seen,
            "tokens_per_s": tokens / dt, "step_time_s": dt, "skipped": skip_reason is not None,
            "skip_reason": skip_reason, "skips_total": self.skips_total,
        }
        record.update(balance)
        if self.peak:
            record["mfu"] = self.flops_per_token * tokens / dt / (self.peak * self.world_size)
        return record

    @torch.no_grad()
    def _validate(self) -> None:
        model = self.model
        model.eval()
        total = torch.zeros((), device=self.device)
        count = 0
        for inputs, targets, *segment_ids in self.val_loader:  # segment ids with data.document_mask
            inputs, targets, *segment_ids = (x.to(self.device) for x in (inputs, targets, *segment_ids))
            total += self.layout.eval_loss(inputs, targets, self.autocast, *segment_ids)
            count += 1
        stats = self.layout.reduce_sum(torch.stack([total, torch.tensor(float(count), device=self.device)]))
        total, count = stats[0], int(stats[1])
        model.train()
        val = float(total) / max(count, 1)
        self.last_val = val
        self.metrics.log({"kind": "val", "step": self.step, "val_loss": val,
                          "val_ppl": math.exp(val) if val < 50 else float("inf"), "batches": count})

    def _gains(self) -> None:
        with self.autocast():
            report = self.layout.residual_gains(self.gain_batch, self.cfg.train.gains_sequences)
        gains = report.as_dict()
        record: dict[str, Any] = {"kind": "gains", "step": self.step, **gains, "h_res": report.h_res.tolist()}
        if self.is_main and self.cfg.logging.plots and self.cfg.residual.streams > 1:
            figures = self.run_dir / "figures"
            title = f"{self.cfg.run_name}:"
            h_path = plot.plot_h_res(report.h_res.numpy(), figures / f"h_res_step_{self.step:07d}.png",
                                     step=self.step, title=title)
            g_path = plot.plot_gains(gains, figures / f"gains_step_{self.step:07d}.png", step=self.step, title=title)
            record["figures"] = {"h_res": str(h_path.relative_to(self.run_dir)),
                                 "gains": str(g_path.relative_to(self.run_dir))}
        self.metrics.log(record)

    def _checkpoint(self, ckpts: CheckpointManager) -> None:
        t0 = time.perf_counter()
        path = ckpts.save(self.step, self.layout, self._trainer_state(), self._meta())
        self.metrics.log({"kind": "checkpoint", "step": self.step, "path": str(path),
                          "seconds": round(time.perf_counter() - t0, 3)})
