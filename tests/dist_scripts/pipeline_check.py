"""Pipeline parallelism against a single-process reference, on CPU (gloo), in one launch.

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/pipeline_check.py --suite full

For every case (schedule x residual variant x recomputation x overlap handler, plus a few
extras) every rank builds the same tiny model (same seed), runs ONE pipelined forward+backward
of a fixed batch split into micro-batches, and sends its loss and the gradients of its stages'
parameters (by their full-model names) to rank 0. Rank 0 compares them with the full model run
on the whole batch in one process:

- loss and every gradient within fp32 tolerance: |got - ref| <= atol + rtol |ref| elementwise
  (rtol 1e-5, atol 1e-6) and ||got - ref|| / ||ref|| <= 1e-5 per parameter, so that parameters
  with small gradients are held to fp32 accuracy too. The pipeline sums the same terms in another
  order (matmuls over smaller batches, the loss as a mean of micro-batch means, gradients
  accumulated micro-batch by micro-batch), so bitwise equality is not expected here,
- every parameter of the model covered by exactly one stage,
- the routers' expert-load counts equal (no stray forward, e.g. a metadata-inference one),
- bitwise equality where the same ops run in the same order: DualPipeV with the overlap handler
  vs without it, and recompute=auto vs off under the same schedule.

One summary line per case; exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from mhc_train.model import MHCTransformer, load_model_config
from mhc_train.parallel.pipeline import build_pipeline
from mhc_train.residual import ResidualConfig
from mhc_train.residual import recompute as recompute_module

# Count block recomputations (backward re-running the residual-stream ops) to show that
# recomputation really happens inside the pipeline stages.
RECOMPUTES = [0]
_original_recompute = recompute_module._Block.recompute


def _counting_recompute(self):
    RECOMPUTES[0] += 1
    return _original_recompute(self)


recompute_module._Block.recompute = _counting_recompute

RTOL, ATOL = 1e-5, 1e-6
REL_NORM = 1e-5  # per parameter: ||got - ref|| / ||ref||, so that small gradients are held to fp32 too
SEQ_LEN = 16


def cases(suite: str, world_size: int) -> list[dict]:
    schedules = [("gpipe", False, "auto"), ("1f1b", False, "auto"), ("interleaved1f1b", False, "auto"),
                 ("zbv", False, "auto"), ("dualpipev", False, "auto"), ("dualpipev", True, "auto")]
    out = []
    if suite == "full":
        for schedule, overlap, conc in schedules:
            for variant in ("baseline", "mhc"):
                for recompute in ("off", "auto"):
                    out.append(dict(schedule=schedule, overlap=overlap, concurrency=conc, variant=variant,
                                    recompute=recompute))
        # The concurrent (threaded) handler path on CPU, with recomputation.
        out.append(dict(schedule="dualpipev", overlap=True, concurrency="threads", variant="mhc", recompute="auto"))
        # HC, explicit uneven stages, the balance loss carried inside the stages.
        out.append(dict(schedule="1f1b", overlap=False, concurrency="auto", variant="hc", recompute="auto"))
        out.append(dict(schedule="1f1b", overlap=False, concurrency="auto", variant="mhc", recompute="2",
                        stage_blocks=[1, 3]))
        for schedule, overlap in (("1f1b", False), ("zbv", False), ("dualpipev", True)):
            out.append(dict(schedule=schedule, overlap=overlap, concurrency="auto", variant="mhc", recompute="auto",
                            aux=1e-2))
    else:  # quick: every schedule once, mHC with recomputation
        for schedule, overlap, conc in schedules:
            out.append(dict(schedule=schedule, overlap=overlap, concurrency=conc, variant="mhc", recompute="auto"))
        out.append(dict(schedule="dualpipev", overlap=True, concurrency="threads", variant="mhc", recompute="auto"))
    for c in out:
        c.setdefault("stage_blocks", None)
        c.setdefault("aux", 0.0)
    return out


def build_model(variant: str, recompute: str, n_layers: int, aux: float) -> MHCTransformer:
    torch.manual_seed(0)
    cfg = load_model_config("tiny", n_layers=n_layers, seq_aux_loss_coef=aux)
    model = MHCTransformer(cfg, ResidualConfig(variant=variant, recompute=recompute))
    return model.train()


def batch(global_batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, vocab, (global_batch, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def loads(model_or_modules) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in model_or_modules.named_buffers() if name.endswith("expert_load")}


def run_case(case: dict, rank: int, world_size: int, n_layers: int, n_mb: int, mb_size: int) -> dict:
    model = build_model(case["variant"], case["recompute"], n_layers, case["aux"])
    tokens, targets = batch(n_mb * mb_size, model.cfg.vocab_size)
    pipe = build_pipeline(model, case["schedule"], n_mb, rank, world_size, microbatch_size=mb_size, seq_len=SEQ_LEN,
                          stage_blocks=case["stage_blocks"], overlap=case["overlap"],
                          overlap_concurrency=case["concurrency"])
    RECOMPUTES[0] = 0
    start = time.perf_counter()
    loss = pipe.step(tokens, targets, broadcast_loss=True)
    elapsed = time.perf_counter() - start
    grads = {name: (p.grad.detach().clone() if p.grad is not None else None) for name, p in pipe.named_parameters()}
    buffers = {}
    for module in pipe.modules:
        buffers.update(loads(module))
    pairs = pipe.overlap_handler.pairs_run if pipe.overlap_handler is not None else 0
    return dict(loss=loss.detach().clone(), grads=grads, loads=buffers, time=elapsed, pairs=pairs,
                stage_blocks=pipe.stage_blocks, recomputes=RECOMPUTES[0])


_references: dict = {}


def reference(case: dict, n_layers: int, global_batch: int):
    key = (case["variant"], case["aux"])
    if key not in _references:
        model = build_model(case["variant"], "off", n_layers, case["aux"])
        tokens, targets = batch(global_batch, model.cfg.vocab_size)
        out = model(tokens, targets)
        out.loss.backward()
        grads = {name: p.grad.detach().clone() if p.grad is not None else None for name, p in model.named_parameters()}
        _references[key] = (out.loss.detach(), grads, loads(model))
    return _references[key]


def compare(case: dict, gathered: list[dict], n_layers: int, global_batch: int) -> tuple[bool, str, dict]:
    ref_loss, ref_grads, ref_loads = reference(case, n_layers, global_batch)
    problems = []
    merged: dict = {}
    for part in gathered:
        for name, g in part["grads"].items():
            if name in merged:
                problems.append(f"{name} on two stages")
            merged[name] = g
    loads_merged = {}
    for part in gathered:
        loads_merged.update(part["loads"])
    missing = sorted(set(ref_grads) - set(merged))
    extra = sorted(set(merged) - set(ref_grads))
    if missing or extra:
        problems.append(f"parameters missing {missing[:3]} extra {extra[:3]}")
    losses = [part["loss"] for part in gathered]
    loss = losses[0]
    if any(not torch.equal(l, loss) for l in losses):
        problems.append("ranks disagree on the loss")
    loss_diff = (loss.double() - ref_loss.double()).abs().item()
    if loss_diff > ATOL + RTOL * ref_loss.abs().item():
        problems.append(f"loss {loss.item():.8f} vs {ref_loss.item():.8f}")
    max_abs, max_rel, worst = 0.0, 0.0, ""
    for name, ref in ref_grads.items():
        got = merged.get(name)
        if ref is None or got is None:
            if (ref is None) != (got is None):
                problems.append(f"{name}: grad None on one side")
            continue
        diff = (got.double() - ref.double()).abs()
        bound = ATOL + RTOL * ref.double().abs()
        d = diff.max().item()
        rel = (diff.norm() / ref.double().norm().clamp_min(1e-30)).item()
        if d > max_abs:
            max_abs, worst = d, name
        max_rel = max(max_rel, rel)
        if bool((diff > bound).any()) or rel > REL_NORM:
            problems.append(f"{name}: max |diff| {d:.3e}, relative norm {rel:.2e}")
    for name, ref in ref_loads.items():
        if name in loads_merged and not torch.equal(loads_merged[name], ref):
            problems.append(f"{name}: router loads differ")
    stats = dict(loss=loss, loss_diff=loss_diff, max_abs=max_abs, max_rel=max_rel, worst=worst, grads=merged)
    return not problems, "; ".join(problems[:4]), stats


def label(case: dict) -> str:
    parts = [case["schedule"] + ("+overlap" if case["overlap"] else ""), case["variant"],
             f"recompute={case['recompute']}"]
    if case["overlap"] and case["concurrency"] != "auto":
        parts.append(f"concurrency={case['concurrency']}")
    if case["stage_blocks"]:
        parts.append(f"stage_blocks={case['stage_blocks']}")
    if case["aux"]:
        parts.append(f"seq_aux={case['aux']}")
    return " ".join(parts)


def bitwise_equal(a: dict, b: dict) -> bool:
    if not torch.equal(a["loss"], b["loss"]) or a["grads"].keys() != b["grads"].keys():
        return False
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a["grads"].values(), (b["grads"][k] for k in a["grads"])))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=("full", "quick"), default="full")
    parser.add_argument("--microbatches", type=int, default=0, help="default: 2 x stages of the V schedules")
    parser.add_argument("--microbatch-size", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    n_layers = 2 * world_size  # two stages per rank for the interleaved and V schedules
    n_mb = args.microbatches or 2 * n_layers
    global_batch = n_mb * args.microbatch_size

    ok_all = True
    results: dict = {}
    total_start = time.perf_counter()
    for case in cases(args.suite, world_size):
        result = run_case(case, rank, world_size, n_layers, n_mb, args.microbatch_size)
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(result, gathered, dst=0)
        if rank == 0:
            ok, why, stats = compare(case, gathered, n_layers, global_batch)
            pairs = sum(part["pairs"] for part in gathered)
            if case["overlap"] and pairs == 0:
                ok, why = False, "overlap handler never ran"
            step_time = max(part["time"] for part in gathered)
            recomputes = sum(part["recomputes"] for part in gathered)
            if (case["recompute"] != "off") != (recomputes > 0):
                ok, why = False, f"{recomputes} block recomputations with recompute={case['recompute']}"
            key = (case["schedule"], case["overlap"], case["concurrency"], case["variant"], case["recompute"],
                   case["aux"], tuple(case["stage_blocks"] or ()))
            results[key] = stats
            checks = []
            if case["overlap"]:  # the handler runs the runtime's computation: bitwise equal
                plain = results.get(("dualpipev", False, "auto", *key[3:]))
                if plain is not None:
                    same = bitwise_equal(stats, plain)
                    checks.append(f"bitwise_vs_no_overlap={same}")
                    ok = ok and same
            if case["recompute"] != "off":  # recomputation re-runs the same ops on the same values
                plain = results.get((*key[:4], "off", *key[5:]))
                if plain is not None:
                    same = bitwise_equal(stats, plain)
                    checks.append(f"bitwise_vs_recompute_off={same}")
                    ok = ok and same
            ok_all = ok_all and ok
            print(f"{'PASS' if ok else 'FAIL'} {label(case)} | stages={gathered[0]['stage_blocks']} "
                  f"loss={stats['loss'].item():.6f} |dloss|={stats['loss_diff']:.2e} "
                  f"max|dgrad|={stats['max_abs']:.2e} max_rel_norm={stats['max_rel']:.2e} "
                  f"overlap_pairs={pairs} recomputes={recomputes} step={step_time * 1000:.0f}ms {' '.join(checks)}"
                  + (f" | {why}" if not ok else ""), flush=True)
    status = torch.tensor([0 if ok_all else 1])
    dist.broadcast(status, src=0)
    if rank == 0:
        print(f"{'ALL PASS' if ok_all else 'SOME FAILED'}: {len(cases(args.suite, world_size))} cases, "
              f"{world_size} ranks, {n_mb} micro-batches of {args.microbatch_size} x {SEQ_LEN} tokens, "
              f"{time.perf_counter() - total_start:.1f}s", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return int(status.item())


if __name__ == "__main__":
    sys.exit(main())
