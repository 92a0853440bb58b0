"""The layout table of ``docs/distributed.md``, generated from committed ``mhc-train-plan --json``
outputs (``docs/data/plan_*.json``), so the docs say exactly what the command said.

    python -m mhc_train.parallel.plan_docs docs/data/plan_3b_8gpu.json docs/data/plan_9b_16gpu.json \\
        docs/data/plan_27b_32gpu.json

prints the markdown table; ``--check docs/distributed.md`` exits 1 when the table between the
``<!-- plan-table -->`` markers of that file differs (tests/test_planner.py runs it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 2**30
BEGIN, END = "<!-- plan-table -->", "<!-- /plan-table -->"


def _overrides(layout: dict) -> str:
    d = layout["degrees"]
    parts = [f"parallel.{k}={d[k]}" for k in ("pp", "dp_replicate", "dp_shard", "ep") if d[k] != 1 or k == "dp_shard"]
    if d["pp"] > 1:
        parts += [f"parallel.pipeline.schedule={layout['schedule']}",
                  f"parallel.pipeline.microbatches={layout['microbatches']}"]
    else:
        parts.append(f"train.grad_accum={layout['microbatches']}")
    if layout.get("reshard_after_forward") is not None:
        parts.append(f"parallel.reshard_after_forward={str(layout['reshard_after_forward']).lower()}")
    parts.append(f"residual.recompute={'auto' if layout['recompute'] else 'off'}")
    return " ".join(parts)


def table(plans: list[dict]) -> str:
    rows = ["| model / GPUs | `parallel=mesh` overrides | train.batch_size (per data rank) | GiB per GPU | "
            "comm per GPU per step (intra / inter node) | bubble | fits / layouts |",
            "|---|---|---|---|---|---|---|"]
    for p in plans:
        lay, c = p["recommended"], p["cluster"]
        batch = lay["micro_batch"] * (lay["microbatches"] if lay["degrees"]["pp"] > 1 else 1)
        comm = lay["comm"]
        rows.append(f"| {p['model']} / {c['gpus']} x {c['gpu_mem_gb']:g} GiB | `{_overrides(lay)}` | {batch} | "
                    f"{lay['bytes_per_gpu']['total'] / GIB:.1f} | {comm['intra_node'] / 1e9:.0f} GB / "
                    f"{comm['inter_node'] / 1e9:.0f} GB ({comm['time_s']:.2f} s) | {lay['bubble']:.1%} | "
                    f"{p['counts']['fit']} / {p['counts']['layouts']} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    check = None
    if argv[:1] == ["--check"]:
        check, argv = Path(argv[1]), argv[2:]
    text = table([json.loads(Path(f).read_text()) for f in argv])
    if check is None:
        print(text, end="")
        return 0
    doc = check.read_text()
    current = doc.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n" if BEGIN in doc else ""
    if current != text:
        print(f"{check}: the plan table differs from {', '.join(argv)}; regenerate it with "
              f"python -m mhc_train.parallel.plan_docs {' '.join(argv)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
