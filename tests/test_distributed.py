"""Data-parallel training through torchrun on CPU (gloo), against single-process runs.

One chain of runs, every one compared with the same single-process reference (tiny mHC model,
global batch 4 x grad_accum 2 of 32 tokens, constant LR after a 2-step warmup, 5 steps):

    reference   1 process, batch 4                                    steps 1-5
    ddp         launch/single_node.sh, NPROC=2, batch 2 per rank       steps 1-2, checkpoint (stop_at)
    fsdp        torchrun, 2 ranks, batch 2, resume=<ddp checkpoint>    steps 3-4, sharded checkpoint
    single      1 process, batch 4, resume=<fsdp checkpoint>          step 5

Each rank's batch is every W-th entry of one shuffled order, so the two ranks' batches together
are the single process's batch (PackedLoader); DDP/FSDP average the ranks' gradients, i.e. the
gradient of the mean loss over the global batch. So the losses agree up to fp32 rounding (sums
taken in another order): |loss - reference| <= 2e-5 (losses are ~6.2; measured differences
~1e-6), grad norms within 1e-4 relative. The routers' load imbalance (a ratio of counts, summed
over ranks) is equal exactly. Also checked: only rank 0 writes metrics / log / .hydra, every step
is logged once, checkpoints move between DDP, FSDP and one process (another DP size).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
COMMON = ["model=tiny", "train.seq_len=32", "train.grad_accum=2", "optim.warmup_steps=2", "optim.schedule=constant",
          "train.steps=5", "train.eval_every=0", "train.gains_every=0", "train.eval_batches=2", "train.threads=1",
          "train.checkpoint_every=0", "logging.progress=false", "logging.plots=false"]
LOSS_ATOL = 2e-5
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def env(subprocess_env) -> dict:
    return subprocess_env


def launch(cmd: list[str], env: dict, cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def python_run(env: dict, cwd: Path, *overrides: str) -> str:
    return launch([sys.executable, "-m", "mhc_train.train", *COMMON, *overrides], env, cwd)


def torchrun(env: dict, cwd: Path, nproc: int, *overrides: str) -> str:
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "mhc_train.train", *COMMON, *overrides], env, cwd)


def run_dir(out: Path, name: str) -> Path:
    dirs = [p.parent for p in (out / "default").glob(f"{name}+*/metrics.jsonl")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def records(d: Path, kind: str = "train") -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == kind]


def assert_close_to(reference: dict[int, dict], got: list[dict], what: str) -> list[float]:
    diffs = []
    for r in got:
        ref = reference[r["step"]]
        diff = abs(r["loss"] - ref["loss"])
        diffs.append(diff)
        assert diff <= LOSS_ATOL, (what, r["step"], r["loss"], ref["loss"])
        assert abs(r["grad_norm"] - ref["grad_norm"]) <= GRAD_RTOL * ref["grad_norm"], (what, r["step"])
        assert r["load_imbalance"] == ref["load_imbalance"], (what, r["step"])
        assert r["tokens"] == ref["tokens"] and r["lr"] == ref["lr"], (what, r["step"])
    return diffs


def test_ddp_fsdp_and_single_process_agree_across_resumes(env, tmp_path):
    out = tmp_path / "runs"
    o = f"output_root={out}"
    python_run(env, tmp_path, o, "run_name=reference", "train.batch_size=4")
    reference = {r["step"]: r for r in records(run_dir(out, "reference"))}
    assert sorted(reference) == [1, 2, 3, 4, 5]

    # DDP, 2 ranks, through the launch script, stopped after step 2 (a checkpoint)
    launch(["bash", str(ROOT / "launch" / "single_node.sh"), *COMMON, o, "run_name=ddp", "train.batch_size=2",
            "train.stop_at=2"], {**env, "NPROC": "2", "PARALLEL": "ddp"}, tmp_path)
    ddp = run_dir(out, "ddp")
    ddp_records = records(ddp)
    assert [r["step"] for r in ddp_records] == [1, 2]  # rank 0 only: each step once
    diffs = assert_close_to(reference, ddp_records, "ddp")
    run_rec = records(ddp, "run")
    assert len(run_rec) == 1 and run_rec[0]["config"]["parallel"]["mode"] == "ddp"
    log = (ddp / "mhc-train.log").read_text()
    assert log.count("training ddp") == 1, log  # ranks > 0 do not write the log
    assert sorted(p.name for p in (ddp / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    ckpt = ddp / "checkpoints" / "step_0000002"
    assert (ckpt / "meta.json").is_file()

    # FSDP2, 2 ranks, continuing the DDP checkpoint: steps 3-4, sharded checkpoint at 4
    torchrun(env, tmp_path, 2, o, "run_name=fsdp", "parallel=fsdp", "train.batch_size=2", "train.stop_at=4",
             f"resume={ckpt}")
    fsdp = run_dir(out, "fsdp")
    fsdp_records = records(fsdp)
    assert [r["step"] for r in fsdp_records] == [3, 4]
    diffs += assert_close_to(reference, fsdp_records, "fsdp")
    fsdp_ckpt = fsdp / "checkpoints" / "step_0000004"
    assert len(list(fsdp_ckpt.glob("*.distcp"))) == 2  # one shard file per rank

    # FSDP2 from scratch: each block materialised and initialised right before it is sharded
    # starts from the single-process weights (per-weight seeded init)
    torchrun(env, tmp_path, 2, o, "run_name=fsdp_scratch", "parallel=fsdp", "train.batch_size=2", "train.stop_at=2")
    scratch = records(run_dir(out, "fsdp_scratch"))
    assert [r["step"] for r in scratch] == [1, 2]
    diffs += assert_close_to(reference, scratch, "fsdp from scratch")

    # one process (another data-parallel size, same global batch) from the sharded checkpoint
    python_run(env, tmp_path, o, "run_name=single", "train.batch_size=4", f"resume={fsdp_ckpt}")
    single_records = records(run_dir(out, "single"))
    assert [r["step"] for r in single_records] == [5]
    diffs += assert_close_to(reference, single_records, "single after fsdp")
    print(f"max |loss - reference| over ddp/fsdp/single steps: {max(diffs):.3g}")


def test_single_mode_refuses_world_size_above_one(env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mhc_train.train", *COMMON, f"output_root={tmp_path}"],
                          env={**env, "WORLD_SIZE": "2"}, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("config error: parallel.mode: single runs one process, but WORLD_SIZE=2")


def test_deepspeed_config_follows_grad_clip():
    from mhc_train.parallel.data_parallel import deepspeed_config

    on = deepspeed_config(micro_batch=2, grad_accum=3, world_size=4, grad_clip=0.5, zero_stage=2, bf16=False)
    assert on["gradient_clipping"] == 0.5 and on["train_batch_size"] == 24 and on["zero_optimization"]["stage"] == 2
    assert on["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # DeepSpeed's default unless smaller
    small = deepspeed_config(micro_batch=1, grad_accum=1, world_size=1, grad_clip=1.0, zero_stage=1, bf16=False,
                             bucket_elements=1000)
    assert small["zero_optimization"]["reduce_bucket_size"] == small["zero_optimization"]["allgather_bucket_size"] == 1000
    for off in (None, 0.0):  # DeepSpeed's own default would clip at 1.0
        assert deepspeed_config(micro_batch=1, grad_accum=1, world_size=1, grad_clip=off, zero_stage=1,
                                bf16=False)["gradient_clipping"] == 0.0
    with pytest.raises(ValueError):
        deepspeed_config(micro_batch=1, grad_accum=1, world_size=1, grad_clip=1.0, zero_stage=3, bf16=False)


def test_deepspeed_bf16_keeps_fp32_weights_under_autocast_unless_told():
    """bf16 runs: fp32 weights, the forward under DeepSpeed's torch autocast, every gradient
    reduced in fp32 (no module lower-precision-safe); bf16 weights only when asked."""
    from mhc_train.parallel.data_parallel import deepspeed_config

    common = dict(micro_batch=1, grad_accum=1, world_size=2, grad_clip=1.0, zero_stage=1)
    autocast = deepspeed_config(**common, bf16=True)
    assert not autocast["bf16"]["enabled"]
    assert autocast["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    weights = deepspeed_config(**common, bf16=True, bf16_weights=True)
    assert weights["bf16"]["enabled"] and "torch_autocast" not in weights
    fp32 = deepspeed_config(**common, bf16=False, bf16_weights=True)  # an fp32 run ignores the setting
    assert not fp32["bf16"]["enabled"] and "torch_autocast" not in fp32
    assert {c["communication_data_type"] for c in (autocast, weights, fp32)} == {"fp32"}


@pytest.mark.parametrize("overrides, message", [
    (["parallel=ddp", "parallel.mode=pipe"], "parallel.mode: must be one of single, ddp, fsdp, deepspeed, pipeline"),
    (["parallel=fsdp", "parallel.backend=mpi"], "parallel.backend: must be auto, nccl or gloo"),
    (["parallel=ddp", "parallel.timeout_s=0"], "parallel.timeout_s: must be > 0 seconds"),
    (["parallel=deepspeed", "parallel.deepspeed_weights=fp16"], "parallel.deepspeed_weights: must be fp32 or bf16"),
    (["parallel=pipeline", "train.grad_accum=2"], "train.grad_accum: with pipeline stages the micro-batches accumulate"),
    (["parallel=pipeline", "parallel.pipeline.schedule=pipedream"], "parallel.pipeline.schedule: unknown schedule"),
    (["parallel=pipeline", "parallel.pipeline.schedule=dualpipev"],  # tiny: 3 blocks, 2 ranks x 2 stages
     "parallel.pipeline.stages_per_rank: 4 stages (2 ranks x 2) need at least one block each"),
    (["parallel=pipeline", "parallel.pipeline.microbatches=3"], "parallel.pipeline.microbatches: the batch of 8"),
    (["parallel=pipeline", "parallel.pipeline.balance=rank"],
     "parallel.pipeline.balance: rank balancing is for the V schedules (zbv, dualpipev), not 1f1b"),
])
def test_parallel_config_errors(overrides, message, monkeypatch):
    from hydra import compose, initialize_config_dir

    from mhc_train.train.config import CONFIG_DIR, ConfigError, register_configs, validate

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "train.seq_len=32", *overrides])
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        validate(cfg)


@pytest.mark.parametrize("mode", ["deepspeed", "pipeline"])
def test_engines_that_need_torchrun_say_so(mode, monkeypatch):
    from hydra import compose, initialize_config_dir

    from mhc_train.train.config import CONFIG_DIR, ConfigError, register_configs, validate

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "train.seq_len=32", f"parallel={mode}"])
    with pytest.raises(ConfigError, match=f"^parallel.mode: {mode} runs under torchrun"):
        validate(cfg)


def test_a_signal_on_one_rank_stops_all_ranks_at_the_same_step(env, tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "dist_scripts" / "signal_one_rank.py"), *COMMON,
                           f"output_root={out}", "run_name=sig", "parallel=ddp", "train.batch_size=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0  # torchrun reports the workers' exit 143
    d = run_dir(out, "sig")
    assert [r["step"] for r in records(d)] == [1, 2]
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_0000002"]
    assert (d / "checkpoints" / "step_0000002" / "meta.json").is_file()
    assert records(d, "end")[-1]["status"] == "interrupted"


# Pipeline parallelism in the trainer: every rank reads the whole batch, the micro-batches of
# parallel.pipeline accumulate the gradient (grad_accum 1). 4 blocks so that DualPipeV's
# 2 ranks x 2 stages each hold one; validation and gains every 2 steps.
PIPE_COMMON = [*(o for o in COMMON if not o.startswith(("train.grad_accum", "train.eval_every", "train.gains_every"))),
               "model.n_layers=4", "train.batch_size=4", "train.eval_every=2", "train.gains_every=2",
               "parallel.pipeline.microbatches=4"]


def test_pipeline_schedules_train_like_one_process_and_move_checkpoints_between_layouts(env, tmp_path):
    """reference: 1 process, steps 1-5. 1f1b (2 stages) steps 1-2 -> dualpipev (4 stages, V, with
    the overlap handler) resumed from that checkpoint, steps 3-4 -> one process, step 5. Losses,
    grad norms, validation losses and the H_res maps behind the gains agree with the reference
    (fp32 reassociation: measured ~1e-6); router loads exactly."""
    out = tmp_path / "runs"
    o = f"output_root={out}"

    def run(*overrides: str, nproc: int = 0) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
            else [sys.executable]
        return launch([*cmd, "-m", "mhc_train.train", *PIPE_COMMON, o, *overrides], env, tmp_path)

    run("run_name=reference")
    ref_dir = run_dir(out, "reference")
    reference = {r["step"]: r for r in records(ref_dir)}
    ref_val = {r["step"]: r["val_loss"] for r in records(ref_dir, "val")}
    ref_h = {r["step"]: r["h_res"] for r in records(ref_dir, "gains")}

    run("run_name=onef1b", "parallel=pipeline", "train.stop_at=2", nproc=2)
    first = run_dir(out, "onef1b")
    run("run_name=dualpipev", "parallel=pipeline", "parallel.pipeline.schedule=dualpipev", "train.stop_at=4",
        f"resume={first / 'checkpoints' / 'step_0000002'}", nproc=2)
    second = run_dir(out, "dualpipev")
    run("run_name=single", f"resume={second / 'checkpoints' / 'step_0000004'}")
    third = run_dir(out, "single")

    diffs = []
    for d, steps in ((first, [1, 2]), (second, [3, 4]), (third, [5])):
        got = records(d)
        assert [r["step"] for r in got] == steps, d.name
        diffs += assert_close_to(reference, got, d.name)
        for r in records(d, "val"):
            assert abs(r["val_loss"] - ref_val[r["step"]]) <= LOSS_ATOL, (d.name, r)
        for r in records(d, "gains"):
            h, ref = torch.tensor(r["h_res"]), torch.tensor(ref_h[r["step"]])
            assert torch.allclose(h, ref, atol=1e-5), (d.name, r["step"], (h - ref).abs().max())
    assert [r["step"] for r in records(second, "gains")] == [4]  # each rank records its stages' H_res
    assert len(list((second / "checkpoints" / "step_0000004").glob("*.distcp"))) == 2  # each rank its stages
    log = (second / "mhc-train.log").read_text()
    assert log.count("training dualpipev") == 1, log
    print(f"max |loss - reference| over 1f1b / dualpipev / single steps: {max(diffs):.3g}")


def test_deepspeed_in_the_trainer_equals_one_process_and_shares_its_checkpoints(env, tmp_path):
    """reference: 1 process, batch 4 x grad_accum 2, steps 1-5, a NaN loss injected at step 3.
    DeepSpeed ZeRO-1 (2 ranks x batch 2) steps 1-2 -> ZeRO-2 resumed from that checkpoint, steps
    3-4 (3 skipped by the engine: non-finite gradients) -> one process from the DeepSpeed
    checkpoint, step 5. Clipping at 0.5 through DeepSpeed's gradient_clipping."""
    out = tmp_path / "runs"
    o = [f"output_root={out}", "train.grad_clip=0.5", "train.inject_nonfinite_at=[3]"]
    ds_env = {**env, "DS_ACCELERATOR": "cpu"}

    def run(*overrides: str, nproc: int = 0) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
            else [sys.executable]
        for _ in range(2):
            proc = subprocess.run([*cmd, "-m", "mhc_train.train", *COMMON, *o, *overrides], cwd=tmp_path, env=ds_env,
                                  capture_output=True, text=True, timeout=240)
            out = proc.stdout + proc.stderr
            # One relaunch only for DeepSpeed's rare CPU start-up abort of a worker (SIGABRT, about
            # one run in ten, before any step); the relaunch continues the run (resume=auto).
            if proc.returncode == 0 or "Signal 6 (SIGABRT)" not in out:
                break
        assert proc.returncode == 0, out[-6000:]

    run("run_name=reference", "train.batch_size=4")
    reference = {r["step"]: r for r in records(run_dir(out, "reference"))}
    assert reference[3]["skipped"] and reference[3]["skip_reason"] == "non-finite loss"
    run("run_name=zero1", "parallel=deepspeed", "train.batch_size=2", "train.stop_at=2", nproc=2)
    zero1 = run_dir(out, "zero1")
    run("run_name=zero2", "parallel=deepspeed", "parallel.zero_stage=2", "train.batch_size=2", "train.stop_at=4",
        f"resume={zero1 / 'checkpoints' / 'step_0000002'}", nproc=2)
    zero2 = run_dir(out, "zero2")
    run("run_name=single", "train.batch_size=4", f"resume={zero2 / 'checkpoints' / 'step_0000004'}")

    diffs = []
    for d, steps in ((zero1, [1, 2]), (zero2, [3, 4]), (run_dir(out, "single"), [5])):
        got = records(d)
        assert [r["step"] for r in got] == steps, d.name
        for r in got:
            assert r["skipped"] == reference[r["step"]]["skipped"], (d.name, r)
        diffs += assert_close_to(reference, [r for r in got if not r["skipped"]], d.name)
    skipped = records(zero2)[0]
    assert skipped["skip_reason"] == "non-finite loss" and skipped["skips_total"] == 1
    assert records(zero1, "run")[0]["config"]["parallel"]["mode"] == "deepspeed"
    print(f"max |loss - reference| over zero1 / zero2 / single steps: {max(diffs):.3g}")


def test_fsdp_materialises_one_block_at_a_time(tmp_path):
    """wrap_fsdp with a meta model: each block is materialised right before it is sharded, while
    the later blocks are still on the meta device (a rank never holds the whole model)."""
    import torch.distributed as dist

    from mhc_train.model import MHCTransformer, load_model_config
    from mhc_train.parallel.data_parallel import wrap_fsdp
    from mhc_train.residual import ResidualConfig

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = MHCTransformer(load_model_config("tiny"), ResidualConfig(variant="mhc"))
        seen = []

        def materialize(module):
            later_blocks_meta = all(p.is_meta for b in model.blocks[len(seen) + 1:] for p in b.parameters())
            seen.append((module, later_blocks_meta))
            module.to_empty(device="cpu")
            model.init_weights(seed=0, only=module)

        wrap_fsdp(model, torch.device("cpu"), materialize=materialize)
        blocks = [m for m, _ in seen[:len(model.blocks)]]
        assert blocks == list(model.blocks) and all(ok for _, ok in seen[:len(model.blocks)])
        assert {id(m) for m, _ in seen[len(model.blocks):]} == {id(model.embed), id(model.contract), id(model.norm),
                                                                  id(model.head)}
        assert not any(p.is_meta for p in model.parameters())
        assert not any(b.is_meta for b in model.buffers())
    finally:
        dist.destroy_process_group()


def test_pipeline_under_bf16_autocast_matches_one_process(env, tmp_path):
    """bf16 autocast (the GPU default): the stage boundaries carry fp32 streams and the last stage
    bf16 logits; a mismatch in the declared dtypes makes the ranks exchange buffers of different
    sizes (gloo aborts). Losses against one process in bf16 within bf16 noise."""
    out = tmp_path / "runs"
    bf16 = [*PIPE_COMMON, f"output_root={out}", "train.precision=bf16", "train.steps=3", "train.stop_at=null"]
    launch([sys.executable, "-m", "mhc_train.train", *bf16, "run_name=reference"], env, tmp_path)
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "mhc_train.train", *bf16, "run_name=pipe", "parallel=pipeline", "parallel.pipeline.schedule=dualpipev"],
           env, tmp_path)
    reference, pipe = records(run_dir(out, "reference")), records(run_dir(out, "pipe"))
    assert [r["step"] for r in pipe] == [1, 2, 3]
    for r, ref in zip(pipe, reference):
        assert abs(r["loss"] - ref["loss"]) < 2e-2, (r["step"], r["loss"], ref["loss"])
    val = records(run_dir(out, "pipe"), "val")
    assert val and abs(val[-1]["val_loss"] - records(run_dir(out, "reference"), "val")[-1]["val_loss"]) < 2e-2
