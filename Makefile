VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test bench info gpu-check test-gpu
setup:            ## create .venv with the pinned stack and mhc-train (editable)
	bash launch/setup_env.sh $(VENV)
test:             ## the test suite (CPU, Triton through its interpreter)
	TRITON_INTERPRET=1 WANDB_MODE=offline DS_ACCELERATOR=cpu $(PY) -m pytest -q tests
bench:            ## baseline / HC / mHC step time side by side (small model)
	$(PY) -m mhc_train.bench.model_step
info:             ## parameter / FLOP / memory summary, e.g. make info ARGS="model=27b residual=mhc"
	$(VENV)/bin/mhc-train-info $(ARGS)
gpu-check:        ## the one-command GPU check, reports in runs/gpu_check/ (make gpu-check ARGS="--out DIR")
	PY=$(PY) bash launch/gpu_check.sh $(ARGS)
test-gpu:         ## the kernel tests compiled for the GPU, with production-shape cases (one line without a GPU)
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  TRITON_INTERPRET=0 MHC_GPU_SHAPES=1 WANDB_MODE=offline $(PY) -m pytest -q tests/test_kernels.py; \
	else echo "test-gpu: no CUDA GPU visible (torch.cuda.is_available() is False): nothing tested"; fi
