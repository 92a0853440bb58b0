"""Text tables of simulation results: one row per (schedule, overlap mode), and the
step-time comparison over stream multipliers n (``--compare-n``)."""

from __future__ import annotations

from dataclasses import replace

from mhc_train.parallel.simulator.engine import SimResult, Times, evaluate
from mhc_train.parallel.simulator.formulas import formula_bubble
from mhc_train.parallel.simulator.schedules import SCHEDULE_TITLES, build_schedule


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def results_table(results: list[SimResult], stage_time_of: dict[str, Times] | None = None,
                  share_of: dict[str, float] | None = None) -> str:
    """Side-by-side table; 'README bubble' is the per-rank formula (zero comm, equal chunks).
    Peak activations count stage-micro-batches; share_of[name] (the fraction of a rank's layers
    in one stage) converts them to units of the rank's whole share of the model."""
    head = ["schedule", "overlap", "chunks/rank", "F/B/W per stage", "step time", "bubble %",
            "max idle/rank", "README bubble", "peak act r0/max", "act x share",
            "exposed comm", "send-blocked"]
    rows = []
    for r in results:
        st = (stage_time_of or {}).get(r.schedule)
        sched = build_schedule(r.schedule, r.ranks, r.microbatches)
        formula = None
        if st is not None:
            fb = replace(st, fb=st.F + st.B) if not r.overlap_fb else st
            formula = formula_bubble(r.schedule, r.ranks, fb)
        rows.append([
            SCHEDULE_TITLES[r.schedule], r.overlap_label, str(len(sched.chunks_of_rank[0])),
            "-" if st is None else f"{_fmt(st.F)}/{_fmt(st.B)}/{_fmt(st.W)}",
            _fmt(r.makespan), f"{100 * r.bubble_fraction:.1f}", _fmt(max(r.idle)),
            "-" if formula is None else _fmt(formula),
            f"{r.peak_memory[0]}/{max(r.peak_memory)}",
            "-" if share_of is None else _fmt(max(r.peak_memory) * share_of[r.schedule]),
            _fmt(r.exposed_comm), _fmt(max(r.blocked)),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def effective_modes(name: str, overlaps: list[str]) -> list[str]:
    """Overlap modes that differ for this schedule: only DualPipe(V) has F&B pairs, so for the
    others 'fb' is 'off' and 'on' is 'comm'."""
    if name in ("dualpipe", "dualpipev"):
        return list(overlaps)
    out: list[str] = []
    for ov in overlaps:
        ov = {"fb": "off", "on": "comm"}.get(ov, ov)
        if ov not in out:
            out.append(ov)
    return out


def compare_n(schedules: list[str], ranks: int, microbatches: int, times: Times, ns: list[float],
              overlaps: list[str], per: str) -> tuple[str, list[dict]]:
    """Step time and exposed comm per schedule and overlap mode for each stream multiplier n."""
    records = []
    for name in schedules:
        for ov in effective_modes(name, overlaps):
            base = None
            for n in ns:
                res = evaluate(name, ranks, microbatches, replace(times, n=n), overlap=ov, per=per)
                base = res.makespan if base is None else base
                records.append({"schedule": name, "overlap": ov, "n": n,
                                "message_time": res.message_time, "step_time": res.makespan,
                                "exposed_comm": res.exposed_comm,
                                "bubble_fraction": res.bubble_fraction,
                                "vs_first_n": res.makespan / base - 1})
    head = ["schedule", "overlap", "n", "message time", "step time", "exposed comm", "bubble %",
            f"step vs n={ns[0]:g}"]
    rows = [[SCHEDULE_TITLES[r["schedule"]], r["overlap"], f"{r['n']:g}", _fmt(r["message_time"]),
             _fmt(r["step_time"]), _fmt(r["exposed_comm"]), f"{100 * r['bubble_fraction']:.1f}",
             f"{100 * r['vs_first_n']:+.1f}%"] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines), records
