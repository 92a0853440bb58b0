"""What the dist scripts share: the trainer's layout for a config, built as the trainer builds it.

The scripts run under torchrun as plain files, so they import this module as a sibling.
"""

from __future__ import annotations

import torch


def build_layout(overrides: list[str], bf16: bool, lr: float = 1e-2):
    """``configs/config.yaml`` with ``overrides``, validated; the model on the meta device, the
    layout ``make_layout`` picks (CPU), prepared, with the run's AdamW attached: (model, layout)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mhc_train.model import MHCTransformer
    from mhc_train.train.config import CONFIG_DIR, register_configs, validate
    from mhc_train.train.layouts import make_layout
    from mhc_train.train.optim import build_optimizer

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = validate(compose("config", overrides=overrides))
    GlobalHydra.instance().clear()
    with torch.device("meta"):
        model = MHCTransformer(cfg.model, cfg.residual)
    layout = make_layout(model, torch.device("cpu"), cfg, bf16=bf16)
    layout.prepare()
    layout.attach(build_optimizer(layout.optimized_module, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
    return model, layout


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
