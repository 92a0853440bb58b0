"""mhc-train under torchrun where only rank 1 receives SIGTERM, after its step 2.

    torchrun --standalone --nproc_per_node=2 tests/dist_scripts/signal_one_rank.py <overrides>

The trainers must agree to stop after the same step (the checkpoint is collective), write one
checkpoint at step 2 and exit 128 + SIGTERM.
"""

import os
import signal
import sys

from mhc_train.train.app import main
from mhc_train.train.trainer import Trainer

real_step = Trainer._train_step


def step_then_sigterm(self):
    record = real_step(self)
    if self.rank == 1 and self.step == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, to this rank only
    return record


Trainer._train_step = step_then_sigterm
main(sys.argv[1:])
