"""``python -m mhc_train.train`` = ``mhc-train``."""

from mhc_train.train.app import main

main()
