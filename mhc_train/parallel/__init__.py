"""Parallelism: pipeline schedules and their simulator (``mhc_train.parallel.simulator``).

Modules here import the model, never the other way round; this file imports nothing so that the
simulator can be used without torch.distributed.
"""
