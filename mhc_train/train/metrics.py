"""Where metrics go: ``run_dir/metrics.jsonl`` always, W&B when enabled, a tqdm bar.

Every record is a flat-ish dict with ``kind`` (run, train, val, gains, checkpoint, end) and
``step`` (optimizer steps done). Only rank 0 writes; other ranks get a ``Metrics`` whose sinks
are empty, so the trainer never branches on the rank.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mhc_train.data import atomic

log = logging.getLogger("mhc_train.train")


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become strings ("nan", "inf") instead of invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonlSink:
    """One JSON object per line, flushed per line, so a crashed run keeps everything it logged."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and self.path.exists():
            self._truncate_after(keep_until_step)
        self._f = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        """On resume from ``step``: drop what the interrupted run logged after its checkpoint, so
        the file reads as one uninterrupted history."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("kind") == "run" or rec.get("step", 0) <= step:
                kept.append(line)
        atomic.write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(_clean(record)) + "\n")
        self._f.flush()

    def close(self, exit_code: int = 0) -> None:
        self._f.close()


def wandb_mode(requested: str) -> str:
    """online / offline. ``auto``: WANDB_MODE when set, else online only with an API key."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "dryrun", "disabled"):
        return "offline"
    if env == "online" or os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        netrc_path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        if os.path.isfile(netrc_path) and netrc.netrc(netrc_path).authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbSink:
    """A W&B run; init never blocks for longer than ``init_timeout`` and a failure only warns."""

    def __init__(self, *, project: str, entity: str | None, name: str, group: str, tags: list[str],
                 config: dict, run_dir: Path, mode: str, init_timeout: float, run_id: str, resume: bool,
                 wandb_dir: str | None = None):
        import wandb

        self.wandb = wandb
        self.run = None
        self.run_dir = Path(run_dir)
        # logging.wandb.dir, else $WANDB_DIR, else the run directory: wandb/ goes below it.
        directory = Path(wandb_dir or os.environ.get("WANDB_DIR") or run_dir).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        self.mode = wandb_mode(mode)
        try:
            self.run = wandb.init(
                project=project, entity=entity, name=name, group=group, tags=list(tags) or None,
                config=config, dir=str(directory), mode=self.mode, id=run_id,
                resume="allow" if resume else None, reinit="finish_previous",
                settings=wandb.Settings(init_timeout=init_timeout, silent=True, console="off"),
            )
        except Exception as e:  # network, auth, a wrong entity: the run goes on without W&B
            log.warning("W&B disabled for this run: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.run = None
            return
        # The JSONL holds what W&B's scalars cannot (per-layer gains, H_res maps); synced live with
        # the run so that `mhc-plot wandb:...` draws every figure. W&B only watches existing files.
        metrics = self.run_dir / "metrics.jsonl"
        try:
            metrics.touch(exist_ok=True)
            self.run.save(str(metrics), base_path=str(self.run_dir), policy="live")
        except Exception as e:
            log.warning("W&B will not hold metrics.jsonl: %s", e)

    def write(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        kind = record.get("kind")
        if kind not in ("train", "val", "gains"):
            return
        data = {}
        for key, value in record.items():
            if key in ("kind", "step") or isinstance(value, (dict, str)):
                continue
            if isinstance(value, list):
                continue  # per-layer lists go to JSONL; W&B gets scalars and images
            data[f"{kind}/{key}"] = value
        if kind == "gains":
            for key in ("composite_forward", "composite_backward", "single_forward", "single_backward"):
                if record.get(key):
                    data[f"gains/max_{key}"] = max(abs(v) for v in record[key])
        if kind == "gains":
            data.update(self._gain_tables(record))
        for key, path in (record.get("figures") or {}).items():
            data[f"figures/{key}"] = self.wandb.Image(str(self.run_dir / path))
        try:
            self.run.log(data, step=int(record["step"]))
        except Exception as e:
            log.warning("W&B log failed at step %s: %s", record.get("step"), e)

    def _gain_tables(self, record: dict[str, Any]) -> dict[str, Any]:
        """Per-layer gains and the H_res maps as W&B data (tables), not only as images: W&B
        alone then holds what the gain figures are drawn from."""
        tables = {}
        keys = [k for k in ("composite_forward", "composite_backward", "single_forward", "single_backward")
                if isinstance(record.get(k), list)]
        if keys:
            rows = [[layer, *(record[k][layer] for k in keys)] for layer in range(min(len(record[k]) for k in keys))]
            tables["gains/per_layer"] = self.wandb.Table(columns=["sublayer", *keys], data=rows)
        h_res = record.get("h_res")
        if isinstance(h_res, list) and h_res:
            rows = [[layer, i, j, float(value)] for layer, matrix in enumerate(h_res)
                    for i, row in enumerate(matrix) for j, value in enumerate(row)]
            tables["gains/h_res"] = self.wandb.Table(columns=["sublayer", "row", "col", "value"], data=rows)
        return tables

    def _copy_metrics(self) -> None:
        """W&B keeps a live-saved file as a link back into the run directory; at the end it gets
        a real copy, so the W&B run (offline directory or synced) holds metrics.jsonl itself and
        ``mhc-plot`` draws from it after the run directory is gone."""
        import shutil

        source, target = self.run_dir / "metrics.jsonl", Path(self.run.dir) / "metrics.jsonl"
        try:
            if source.is_file():
                tmp = target.with_name(".metrics.jsonl.copy")
                shutil.copyfile(source, tmp)
                os.replace(tmp, target)  # replaces the link itself, not the file it points to
        except OSError as e:
            log.warning("W&B will hold a link to metrics.jsonl, not a copy: %s", e)

    def close(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self._copy_metrics()
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as e:
                log.warning("W&B finish failed: %s", e)
            self.run = None


class ProgressBar:
    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                            mininterval=0.5, smoothing=0.1)

    def write(self, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        kind = record.get("kind")
        if kind == "train":
            self.bar.update(record["step"] - self.bar.n)
            post = {"loss": f"{record['loss']:.3f}" if isinstance(record.get("loss"), float) and
                    math.isfinite(record["loss"]) else str(record.get("loss")),
                    "tok/s": f"{record.get('tokens_per_s', 0):.0f}"}
            if self.last_val is not None:
                post["val"] = f"{self.last_val:.3f}"
            self.bar.set_postfix(post, refresh=False)
        elif kind == "val":
            self.last_val = record["val_loss"]

    last_val: float | None = None

    def close(self, exit_code: int = 0) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Metrics:
    """Fan-out to the sinks; ``rank != 0`` gets none."""

    def __init__(self, sinks: list):
        self.sinks = sinks
        self.start = time.time()

    def log(self, record: dict[str, Any]) -> None:
        record.setdefault("time", round(time.time(), 3))
        for sink in self.sinks:
            sink.write(record)

    def close(self, exit_code: int = 0) -> None:
        for sink in reversed(self.sinks):
            try:
                sink.close(exit_code)
            except Exception as e:  # closing must not hide the real error
                warnings.warn(f"closing {type(sink).__name__} failed: {e}")
