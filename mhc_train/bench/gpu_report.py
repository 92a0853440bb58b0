"""GPU check, reports: ``gpu_report.json`` (every figure) and ``gpu_report.md`` (a summary to paste
into docs/benchmarks.md): a header with the device and versions, a table of the sections with
their time against the budget, then per section its status, summary lines and one table.

Sections hand over plain dicts: ``summary`` (lines), ``rows`` (the table) and anything else,
which only the JSON keeps. Non-finite numbers are written as strings ("nan", "inf") so that the
JSON stays valid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# section -> the columns of its markdown table: (key, header, format); a column that is empty in
# every row is left out.
COLUMNS = {
    "kernels": [("op", "op", None), ("C", "C", None), ("outputs_max_rel_error", "outputs: max rel. error", ".2e"),
                ("grads_max_rel_error", "gradients: max rel. error", ".2e"), ("worst", "worst tensor", None),
                ("worst_ratio", "worst / its tolerance", ".2f"), ("passed", "pass", None), ("error", "error", None)],
    "bandwidth": [("C", "C", None), ("op", "op", None), ("impl", "impl", None), ("fwd_ms", "fwd ms", ".3f"),
                  ("fwd_bwd_ms", "fwd+bwd ms", ".3f"), ("bytes_per_token", "B/token", "d"),
                  ("fwd_GBps", "fwd GB/s", ".0f"), ("pct_of_copy", "% of copy", ".0f"), ("error", "error", None)],
    "sinkhorn": [("impl", "impl", None), ("fwd_ms", "fwd ms", ".3f"), ("fwd_bwd_ms", "fwd+bwd ms", ".3f"),
                 ("repeats", "runs", "d")],
    "step": [("variant", "residual", None), ("backend", "backend", None), ("mode", "mode", None),
             ("median_ms", "step ms (median)", ".1f"), ("min_ms", "min ms", ".1f"),
             ("tokens_per_s", "tokens/s", ".0f"), ("vs_baseline", "vs baseline", ".3f"),
             ("peak_step_GiB", "step peak GiB", ".2f"), ("params_GiB", "params GiB", ".2f"),
             ("warmup_s", "warm-up s", ".1f"), ("graph_breaks", "graph breaks", "d"), ("status", "status", None)],
    "train": [("steps", "steps", "d"), ("first_loss", "first loss", ".4f"), ("last_loss", "last loss", ".4f"),
              ("val_loss", "val loss", ".4f"), ("first_step_s", "first step s", ".1f"),
              ("step_time_ms", "step ms (median)", ".1f"), ("tokens_per_s", "tokens/s", ".0f"), ("mfu", "MFU", ".3f")],
}


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def tail(text: str, lines: int = 20) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if fmt and isinstance(value, (int, float)):
        return format(int(value) if fmt == "d" else value, fmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], columns: list[tuple[str, str, str | None]]) -> list[str]:
    used = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in used) + " |", "|" + "---|" * len(used)]
    lines += ["| " + " | ".join(cell(r.get(k), f) for k, _, f in used) + " |" for r in rows]
    return lines


def markdown(report: dict) -> str:
    env = report["environment"]
    passed = [name for name, s in report["sections"].items() if s["status"] == "passed"]
    failed = [name for name in report["sections"] if name not in passed]
    verdict = "all sections passed" if not failed else f"{len(failed)} of {len(report['sections'])} sections " \
        f"did not pass: {', '.join(failed)}"
    if not report.get("finished", True):  # written before a section ended: the check may have been stopped
        verdict = "incomplete (written while the check ran, or it was stopped); " + verdict
    hardware = ""
    if env.get("memory_GiB"):
        hardware = (f" ({env['memory_GiB']:.0f} GiB, {env['multiprocessors']} SMs, compute capability "
                    f"{env['compute_capability']})")
    lines = [f"# GPU check: {env['device_name']}{hardware}, {env['date']}", "",
             f"torch {env['torch']}, triton {cell(env['triton'], None)}, CUDA {cell(env['cuda'], None)}, "
             f"commit {cell(env['commit'], None)}; "
             f"shapes: {report['shapes_name']}; {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget. "
             f"**Result: {verdict}.**", "",
             "| section | status | seconds | estimate / cap s |", "|---|---|---|---|"]
    for i, (name, s) in enumerate(report["sections"].items(), 1):
        lines.append(f"| {i}. {s['title']} | {s['status']} | {s.get('seconds', 0.0):.1f} | "
                     f"{s['estimate_s']:.0f} / {s['cap_s']:.0f} |")
    for i, (name, s) in enumerate(report["sections"].items(), 1):
        lines += ["", f"## {i}. {s['title']}", ""]
        if s.get("error"):
            lines += [f"**{s['status']}**: {cell(s['error'], None)}", ""]
        lines += [f"- {line}" for line in s.get("summary", [])]
        if s.get("rows"):
            lines += [""] + table(s["rows"], COLUMNS[name])
    return "\n".join(lines) + "\n"


def write_reports(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_report.json", out / "gpu_report.md"
    json_path.write_text(json.dumps(json_safe(report), indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path
