VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test bench info
setup:            ## create .venv with the pinned stack and mhc-train (editable)
	bash launch/setup_env.sh $(VENV)
test:             ## the test suite (CPU, Triton through its interpreter)
	TRITON_INTERPRET=1 WANDB_MODE=offline DS_ACCELERATOR=cpu $(PY) -m pytest -q tests
bench:            ## baseline / HC / mHC step time side by side (small model)
	$(PY) -m mhc_train.bench.model_step
info:             ## parameter / FLOP / memory summary, e.g. make info ARGS="model=27b residual=mhc"
	$(VENV)/bin/mhc-train-info $(ARGS)
