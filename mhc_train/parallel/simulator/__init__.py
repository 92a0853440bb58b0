"""Pipeline schedule simulator: step time, bubble, activation memory and exposed communication of
1F1B, ZB1P (ZB-H1), ZB-V, DualPipe and DualPipeV, with and without overlap.

    python -m mhc_train.parallel.simulator --ranks 4 --microbatches 8 --F 1 --B 2 --W 1 \\
        --comm 0.1 --n 4 --schedules 1f1b,zbv,dualpipev --overlap both --png timeline.png
    python -m mhc_train.parallel.simulator --ranks 4 --microbatches 16 --comm 0.2 --compare-n 1,4

The model (docs/simulator.md has the long form):
- Each schedule is a list of compute actions per rank, generated programmatically (the DualPipe
  family follows the 8 labelled steps of deepseek-ai/DualPipe's ``step``). An action is F
  (forward), B (full backward), I (input-gradient half of a split backward), W (weight-gradient
  half) of one stage on one micro-batch, or an F&B pair (a forward and a backward chunk run
  overlapped).
- Every rank runs its list in order on one compute lane (list scheduling): an action starts when
  the lane is free and its inputs are there. F(s, m) needs F(s-1, m); B/I(s, m) needs F(s, m) and
  B/I(s+1, m); W(s, m) needs I(s, m). Crossing to another rank costs one message on the directed
  link between the two ranks (links serialise their messages). If no rank can start its next
  action the schedule is deadlocked and :class:`ScheduleDeadlock` says where.
- Overlap of F&B pairs: a pair takes ``--fb`` or max(F, B) + ``--fb-overhead``; without it the
  pair runs as F then B. Overlap of communication: sends run on the link while compute goes on;
  without it the compute lane waits until the rank's sends are delivered.
- Activation memory: +1 when a forward starts, -1 when the stage's backward no longer needs it,
  i.e. at the end of B, or of W when the backward is split (W needs the saved inputs).

Layout (each file imports only the ones above it):
- ``schedules``: the per-rank action lists (Op, Pair, Schedule, schedule_1f1b ...
  schedule_dualpipev, build_schedule) and the schedules' input requirements.
- ``engine``: Times, the list-scheduling simulation (simulate) and evaluate (one schedule in one
  overlap mode, with its exposed communication).
- ``formulas``: the DualPipe README's bubble formulas, used to check the simulation.
- ``reports``: the printed tables.
- ``cli``: the ``mhc-train-simulate`` command line (``main``); ``python -m`` runs it too.

Every name is re-exported here: ``from mhc_train.parallel.simulator import Times`` works.
"""

from mhc_train.parallel.simulator.schedules import (
    BUILDERS,
    SCHEDULE_TITLES,
    SCHEDULES,
    Action,
    Op,
    Pair,
    Schedule,
    SimulatorInputError,
    build_schedule,
    check_schedule_input,
    schedule_1f1b,
    schedule_dualpipe,
    schedule_dualpipev,
    schedule_zb1p,
    schedule_zbv,
)
from mhc_train.parallel.simulator.engine import (
    OVERLAP_MODES,
    Interval,
    ScheduleDeadlock,
    SimResult,
    Times,
    evaluate,
    simulate,
    stage_times,
)
from mhc_train.parallel.simulator.formulas import formula_bubble, formula_conditions
from mhc_train.parallel.simulator.reports import compare_n, effective_modes, results_table
from mhc_train.parallel.simulator.cli import OVERLAP_CHOICES, main, run

__all__ = [
    "Action", "BUILDERS", "Interval", "OVERLAP_CHOICES", "OVERLAP_MODES", "Op", "Pair",
    "SCHEDULES", "SCHEDULE_TITLES", "Schedule", "ScheduleDeadlock", "SimResult",
    "SimulatorInputError", "Times", "build_schedule", "check_schedule_input", "compare_n",
    "effective_modes", "evaluate", "formula_bubble", "formula_conditions", "main",
    "results_table", "run", "schedule_1f1b", "schedule_dualpipe", "schedule_dualpipev",
    "schedule_zb1p", "schedule_zbv", "simulate", "stage_times",
]
