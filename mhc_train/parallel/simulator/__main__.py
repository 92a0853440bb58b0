"""``python -m mhc_train.parallel.simulator``: the ``mhc-train-simulate`` command line."""

import sys

from mhc_train.parallel.simulator.cli import main

sys.exit(main())
