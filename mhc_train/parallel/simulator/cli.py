"""The ``mhc-train-simulate`` command line: options from defaults, --config and flags; prints
the tables, and optionally the action lists, a timeline PNG and a JSON file of the results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mhc_train.parallel.simulator.engine import (
    OVERLAP_MODES,
    ScheduleDeadlock,
    Times,
    evaluate,
    stage_times,
)
from mhc_train.parallel.simulator.formulas import formula_conditions
from mhc_train.parallel.simulator.reports import _fmt, compare_n, effective_modes, results_table
from mhc_train.parallel.simulator.schedules import (
    SCHEDULE_TITLES,
    SCHEDULES,
    SimulatorInputError,
    build_schedule,
    check_schedule_input,
)

# --overlap shorthands -> the overlap modes they stand for
OVERLAP_CHOICES = {"both": ("off", "on"), "all": ("off", "fb", "comm", "on")}

_TIME_KEYS = ("F", "B", "W", "fb", "fb_overhead", "a2a_f", "a2a_b", "comm", "message_bytes", "bandwidth",
              "latency", "n")
_DEFAULTS = {"ranks": 4, "microbatches": 8, "schedules": "1f1b,zbv,dualpipev", "overlap": "both",
             "per": "rank", "F": 1.0, "B": 2.0, "W": 1.0, "fb_overhead": 0.0, "a2a_f": 0.0, "a2a_b": 0.0,
             "latency": 0.0, "n": 1.0}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mhc-train-simulate",
        description="Simulate pipeline schedules (1F1B, ZB1P, ZB-V, DualPipe, DualPipeV) and "
                    "report step time, bubble, peak activation memory and exposed communication. "
                    "Times are in one arbitrary unit (ms, say). Values come from the defaults, "
                    "then --config, then the flags given.",
        epilog="Example: --ranks 4 --microbatches 8 --F 1 --B 2 --W 1 --comm 0.1 --n 4 "
               "--schedules 1f1b,zbv,dualpipev --overlap both --png out.png. "
               "Bracketed values are the defaults. Exit status 2 on bad input.")
    a = p.add_argument
    a("--config", help="JSON or YAML file whose keys are these flags' names with underscores "
                       "(ranks, microbatches, F, B, W, fb, comm, n, schedules, overlap, ...)")
    a("--ranks", type=int, help="pipeline ranks (devices) [4]")
    a("--microbatches", type=int, help="micro-batches per step, both directions together for "
                                       "dualpipe [8]")
    a("--schedules", help=f"comma-separated, from {','.join(SCHEDULES)} [1f1b,zbv,dualpipev]")
    a("--overlap", help="off | fb (F&B pairs overlapped) | comm (sends overlap compute) | "
                        "on (both) | both (= off and on) | all; comma lists allowed [both]")
    a("--per", choices=("rank", "stage"),
      help="'rank': F/B/W/fb are one micro-batch through the layers one rank holds (1F1B "
           "stage); V-shape schedules (zbv, dualpipev) split them into two stages of half the "
           "time. 'stage': the times are per stage whatever the schedule (the README table's "
           "convention) [rank]")
    a("--F", type=float, help="forward compute time [1.0]")
    a("--B", type=float, help="full backward compute time (input grad + weight grad) [2.0]")
    a("--W", type=float, help="weight-gradient part of B; the input-gradient part is B - W [1.0]")
    a("--a2a-f", dest="a2a_f", type=float,
      help="expert all-to-all time inside one forward chunk (dispatch + combine), exposed unless an "
           "overlapped F&B pair hides it [0]")
    a("--a2a-b", dest="a2a_b", type=float,
      help="expert all-to-all time inside one backward chunk [0]")
    a("--fb", type=float, help="time of an overlapped F&B pair, e.g. measured (default max(F + B, "
                               "a2a_f + a2a_b) + --fb-overhead: a pair hides communication, not compute)")
    a("--fb-overhead", dest="fb_overhead", type=float,
      help="added to the default pair time [0]")
    a("--comm", type=float, help="time of one stage-boundary message at n = 1 (activation "
                                 "or its gradient) [0]")
    a("--message-bytes", dest="message_bytes", type=float,
      help="bytes of one message at n = 1 (e.g. micro-batch x seq x C x 2); with --bandwidth, "
           "instead of --comm")
    a("--bandwidth", type=float, help="bytes per time unit of one link")
    a("--latency", type=float, help="fixed time per message, not scaled by n [0]")
    a("--n", type=float, help="residual-stream multiplier of the messages (mHC/HC: n; baseline: "
                              "1) [1]")
    a("--compare-n", dest="compare_n",
      help="comma list of n (e.g. 1,4): table of step time and exposed comm per schedule and "
           "overlap mode for each n")
    a("--png", help="write the timelines as a PNG; a path containing {schedule} and "
                    "{overlap} gives one file per run")
    a("--dpi", type=int, help="PNG resolution [90]")
    a("--json", help="write all results as JSON")
    a("--actions", action="store_true", help="print each rank's action list")
    return p


def _load_config(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SimulatorInputError(f"{path}: expected a mapping of option names to values")
    known = set(_DEFAULTS) | set(_TIME_KEYS) | {"compare_n", "png", "json", "dpi"}
    unknown = sorted(set(k.replace("-", "_") for k in data) - known)
    if unknown:
        raise SimulatorInputError(f"{path}: unknown keys {', '.join(unknown)}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _split(value, cast=str) -> list:
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(v.strip()) for v in str(value).split(",") if v.strip()]


def _overlap_modes(value) -> list[str]:
    modes: list[str] = []
    if isinstance(value, bool):  # YAML reads a bare off / on as a boolean
        value = "on" if value else "off"
    for v in _split(value):
        for m in OVERLAP_CHOICES.get(v, (v,)):
            if m not in OVERLAP_MODES:
                raise SimulatorInputError(
                    f"unknown overlap mode {m!r}; choose from off, fb, comm, on, both, all")
            if m not in modes:
                modes.append(m)
    return modes


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    opts = dict(_DEFAULTS)
    if args.config:
        try:
            opts.update(_load_config(args.config))
        except OSError as e:
            raise SimulatorInputError(f"cannot read config: {e}") from e
        except (json.JSONDecodeError, ValueError) as e:
            if isinstance(e, SimulatorInputError):
                raise
            raise SimulatorInputError(f"{args.config}: {e}") from e
    opts.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    try:
        times = Times(**{k: (None if opts.get(k) is None else float(opts[k]))
                         for k in _TIME_KEYS if k in opts})
        ranks, micro = int(opts["ranks"]), int(opts["microbatches"])
    except (TypeError, ValueError) as e:
        raise SimulatorInputError(f"bad value: {e}") from e
    times.validate()
    schedules = _split(opts["schedules"], lambda s: s.lower())
    overlaps = _overlap_modes(opts["overlap"])
    per = opts["per"]
    if per not in ("rank", "stage"):
        raise SimulatorInputError(f"per must be 'rank' or 'stage', got {per!r}")
    for name in schedules:
        check_schedule_input(name, ranks, micro)

    default_pair = "max(F+B,a2a_f+a2a_b)" + (f"+{_fmt(times.fb_overhead)}" if times.fb_overhead else "")
    a2a = f" a2a_f={_fmt(times.a2a_f)} a2a_b={_fmt(times.a2a_b)}" if times.a2a_f or times.a2a_b else ""
    print(f"{ranks} ranks, {micro} micro-batches, times per {per}: F={_fmt(times.F)} "
          f"B={_fmt(times.B)} W={_fmt(times.W)}{a2a} F&B="
          f"{_fmt(times.fb) if times.fb is not None else default_pair}"
          f", message time {_fmt(times.message_time)} (n={times.n:g})")
    out: dict = {"options": opts}
    if opts.get("compare_n") is not None:
        ns = _split(opts["compare_n"], float)
        for n in ns:
            if not n >= 1:
                raise SimulatorInputError(f"compare-n values must be >= 1, got {n:g}")
        if times.message_time == 0:
            raise SimulatorInputError("--compare-n needs a message time: give --comm or "
                                      "--message-bytes and --bandwidth")
        table, records = compare_n(schedules, ranks, micro, times, ns, overlaps, per)
        print(table)
        out["compare_n"] = records
    results = [evaluate(name, ranks, micro, times, overlap=ov, per=per)
               for name in schedules for ov in effective_modes(name, overlaps)]
    if opts.get("compare_n") is None:
        shares = None if per == "stage" else {
            s: stage_times(s, times, per).F / times.F for s in schedules}
        print(results_table(results, {s: stage_times(s, times, per) for s in schedules}, shares))
        if times.message_time == 0:
            notes = {formula_conditions(s, stage_times(s, times, per)) for s in schedules} - {""}
            if notes:
                print("note: " + "; ".join(sorted(notes)) + " (docs/simulator.md)")
        else:
            print("note: README bubble assumes zero communication")
    if args.actions:
        for name in schedules:
            sched = build_schedule(name, ranks, micro)
            print(f"{SCHEDULE_TITLES[name]} actions:")
            for r, acts in enumerate(sched.actions):
                print(f"  rank {r}: " + " ".join(str(a) for a in acts))
    if opts.get("png"):
        from mhc_train.parallel.timeline_plot import plot_timelines

        for path in plot_timelines(results, opts["png"], dpi=int(opts.get("dpi", 90))):
            print(f"wrote {path}")
    out["results"] = [{
        "schedule": r.schedule, "overlap": r.overlap_label, "step_time": r.makespan,
        "bubble_fraction": r.bubble_fraction, "idle": r.idle, "busy": r.busy,
        "peak_memory": r.peak_memory, "exposed_comm": r.exposed_comm, "blocked": r.blocked,
        "message_time": r.message_time} for r in results]
    if opts.get("json"):
        Path(opts["json"]).write_text(json.dumps(out, indent=1))
        print(f"wrote {opts['json']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except SimulatorInputError as e:
        print(f"mhc-train-simulate: error: {e}", file=sys.stderr)
        return 2
    except ScheduleDeadlock as e:  # only a broken schedule generator gets here
        print(f"mhc-train-simulate: error: {e}", file=sys.stderr)
        return 1
