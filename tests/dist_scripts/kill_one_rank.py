"""mhc-train under torchrun where one rank dies abruptly (SIGKILL, no clean-up) after a step.

    MHC_KILL_RANK=1 MHC_KILL_STEP=3 torchrun --standalone --nproc_per_node=2 \
        tests/dist_scripts/kill_one_rank.py <overrides>

Environment (read by this script only; the trainer is not changed):
    MHC_KILL_RANK      the rank that dies (default 1)
    MHC_KILL_STEP      it dies right after this step's update (before the step's checkpoint, if due)
    MHC_KILL_ATTEMPT   die only in this torchrun attempt (TORCHELASTIC_RESTART_COUNT, default 0),
                       so that with --max-restarts the restarted workers run through
    MHC_HANG=1         instead of dying, the rank hangs (sleeps) after that step, with SIGTERM back
                       to its default action (torchrun's SIGTERM then ends it): its peers block in
                       the next collective until parallel.timeout_s passes
"""

import os
import signal
import sys
import time

from mhc_train.train.app import main
from mhc_train.train.trainer import Trainer

KILL_RANK = int(os.environ.get("MHC_KILL_RANK", "1"))
KILL_STEP = int(os.environ.get("MHC_KILL_STEP", "0"))
KILL_ATTEMPT = int(os.environ.get("MHC_KILL_ATTEMPT", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
HANG = os.environ.get("MHC_HANG") == "1"

real_step = Trainer._train_step


def step_then_die(self):
    record = real_step(self)
    if self.rank == KILL_RANK and self.step == KILL_STEP and ATTEMPT == KILL_ATTEMPT:
        what = "hangs" if HANG else "SIGKILLs itself"
        print(f"kill_one_rank: rank {self.rank} {what} after step {self.step} (attempt {ATTEMPT})",
              file=sys.stderr, flush=True)
        if HANG:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the trainer's handler would only set a flag
            time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)
    return record


Trainer._train_step = step_then_die
main(sys.argv[1:])
