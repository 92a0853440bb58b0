"""DeepSpeed ZeRO-1/2 state in the checkpoint format of the other modes (``get_state_dict``).

Single-process, DDP and FSDP2 runs checkpoint ``get_state_dict(model, optimizer)``: the model's
state dict and an optimizer state dict keyed by parameter name (FQN)::

    {"state": {fqn: {"step": float32 scalar, "exp_avg": full tensor, "exp_avg_sq": full tensor}},
     "param_groups": [{"lr": ..., "betas": ..., "weight_decay": ..., ..., "params": [fqn, ...]}]}

Under ZeRO the run's torch AdamW no longer sees the parameters: each rank holds, per param
group, one flat fp32 partition (its slice of all the group's parameters concatenated) and the
AdamW state of that flat tensor. DeepSpeed's fragment mapping (``param._hp_mapping``) says which
slice of the partition belongs to which parameter; ``deepspeed.utils.safe_get_full_*`` assemble
a parameter's full fp32 value / moment from every rank's slice (one all-reduce per parameter
and key: every rank must call them, in the same order) and ``safe_set_full_*`` write a rank's
own slice from a full tensor. This module translates both ways:

    model_sd, optim_sd = deepspeed_state_dicts(engine, model)        save: full tensors, every rank
    dcp.save({"model": model_sd, "optim": optim_sd}, ...)            (DCP writes replicated keys once)

    model_sd, optim_sd = deepspeed_state_dicts(fresh_engine, model)  load: the template (full shapes)
    dcp.load({"model": model_sd, "optim": optim_sd}, ...)
    load_deepspeed_state_dicts(fresh_engine, model, model_sd, optim_sd)

``deepspeed_state_dicts`` works on an engine that has not stepped yet (it creates the empty
AdamW state first, see ``init_deepspeed_optimizer_state``), so it also builds the load template.

Differences from a plain AdamW, both due to ZeRO's flat partitions:

- One ``step`` per param group (the flat tensor's), stored under every parameter of the group.
  Loading takes the largest ``step`` among a group's parameters.
- A parameter that never gets a gradient (one the forward does not use, like HC's post maps
  under ``residual.fix_post``) is still part of its flat partition, which AdamW steps with a zero
  gradient (so weight decay still shrinks it): it has state (zero moments) where torch's AdamW,
  which skips ``grad is None``, has none.

The model entries of parameters are ZeRO's fp32 master weights (with
``parallel.deepspeed_weights=bf16`` the module holds bf16 copies), as the other modes store fp32
parameters; buffers share storage with the model's, as in ``get_state_dict``. Checked in fp32,
ZeRO-1 and ZeRO-2, on DeepSpeed 0.19.8 (tests/dist_scripts/deepspeed_state_check.py); bf16 runs
with either weight setting resumed from a step-2 checkpoint to the uninterrupted run's losses and
grad norms, bitwise (by hand through the trainer, 2 ranks, not in CI).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

StateDict = dict[str, Any]


def _param_groups(engine) -> list[tuple[list[nn.Parameter], torch.Tensor, dict[str, Any]]]:
    """(model parameters, flat fp32 partition, base optimizer group) per param group."""
    zero = engine.optimizer  # DeepSpeedZeroOptimizer or BF16_Optimizer; .optimizer is the run's AdamW
    # The client optimizer's groups, in its order (model parameters, any dtype), under the name
    # each wrapper uses: ZeRO-1/2 bit16_groups, BF16_Optimizer (bf16 with fp32 gradient
    # accumulation, ZeRO-1) bf16_groups.
    lp_groups = zero.bit16_groups if hasattr(zero, "bit16_groups") else zero.bf16_groups
    return [(params, group["params"][0], group) for params, group in zip(lp_groups, zero.optimizer.param_groups)]


def init_deepspeed_optimizer_state(engine) -> None:
    """Create the base optimizer's state if it has not stepped yet, and link every parameter to
    its slice of it (what the ``safe_*_full_optimizer_state`` helpers read and write).

    AdamW creates its state at the first step. As torch's ``get_state_dict`` does for a fresh
    optimizer, step once with zero gradients and lr 0 (AdamW leaves the weights exactly as they
    are), then reset ``step`` to 0: the state is the one AdamW would create itself.

    The link is always redone here: DeepSpeed (0.19.8) links all groups right after the *first*
    group's first step, when the other groups have no state yet, so with more than one param
    group (ours: decay / no decay) the later groups' parameters stay linked to nothing and the
    helpers raise "exp_avg not found in optimizer state fragment". Relinking only re-creates the
    views into the current state tensors.
    """
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    base = engine.optimizer.optimizer
    groups = _param_groups(engine)
    if not base.state:
        lrs = [group["lr"] for group in base.param_groups]
        for _, flat, group in groups:
            flat.grad = torch.zeros_like(flat)
            group["lr"] = 0.0
        base.step()
        for (_, flat, group), lr in zip(groups, lrs):
            flat.grad = None
            group["lr"] = lr
            base.state[flat]["step"].zero_()
    for params, flat, _ in groups:
        lazy_init_hp_params_optimizer_state(params, flat, base.state)


def _fqns(model: nn.Module) -> dict[nn.Parameter, str]:
    return {p: name for name, p in model.named_parameters()}


def deepspeed_state_dicts(engine, model: nn.Module) -> tuple[StateDict, StateDict]:
    """(model state dict, optimizer state dict) as ``get_state_dict(model, AdamW)`` gives them for
    the unwrapped model; full tensors on every rank, in host memory (each is moved off the device
    as soon as it is gathered: the full fp32 weights and moments would not fit beside a model that
    needs ZeRO). Collective: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    init_deepspeed_optimizer_state(engine)
    base = engine.optimizer.optimizer
    fqns = _fqns(model)
    model_sd = model.state_dict()  # buffers (routers' expert_bias) as they are
    state: StateDict = {}
    param_groups = []
    for params, flat, group in _param_groups(engine):
        flat_state = base.state[flat]
        for p in params:
            model_sd[fqns[p]] = safe_get_full_fp32_param(p).cpu()
            # Tensors shaped like the partition are per-element (moments); the rest (step) is
            # one value for the whole group.
            state[fqns[p]] = {key: safe_get_full_optimizer_state(p, key).cpu()
                              if torch.is_tensor(value) and value.shape == flat.shape else _copy(value)
                              for key, value in flat_state.items()}
        param_groups.append({**{k: v for k, v in group.items() if k != "params"},
                             "params": [fqns[p] for p in params]})
    return model_sd, {"state": state, "param_groups": param_groups}


def _copy(value: Any) -> Any:
    return value.detach().cpu().clone() if torch.is_tensor(value) else value


@torch.no_grad()
def load_deepspeed_state_dicts(engine, model: nn.Module, model_sd: StateDict, optim_sd: StateDict) -> None:
    """Load ``get_state_dict``-format state into a DeepSpeed engine: the model (parameters and
    buffers), ZeRO's fp32 master partitions, the AdamW moments and step, the groups' hyper-
    parameters. Parameters missing from ``optim_sd["state"]`` keep their current state."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    init_deepspeed_optimizer_state(engine)
    base = engine.optimizer.optimizer
    fqns = _fqns(model)
    # The model's parameters are views into DeepSpeed's flat buffers: loading copies into them.
    model.load_state_dict(model_sd)
    groups = _param_groups(engine)
    if len(optim_sd["param_groups"]) != len(groups):
        raise ValueError(f"optimizer state: {len(optim_sd['param_groups'])} param groups, "
                         f"the DeepSpeed engine has {len(groups)}")
    for (params, flat, group), saved_group in zip(groups, optim_sd["param_groups"]):
        names = [fqns[p] for p in params]
        if list(saved_group["params"]) != names:
            raise ValueError("optimizer state: the param groups hold other parameters than the engine's")
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        flat_state = base.state[flat]
        steps = []
        for p, name in zip(params, names):
            # The master copy is what the next step updates (and copies back into the model).
            safe_set_full_fp32_param(p, model_sd[name].to(torch.float32))
            saved = optim_sd["state"].get(name)
            if saved is None:
                continue
            for key, value in saved.items():
                current = flat_state.get(key)
                if torch.is_tensor(current) and current.shape == flat.shape:
                    safe_set_full_optimizer_state(p, value.to(current.dtype), key)
                elif key == "step":
                    steps.append(value)
        if steps:  # ZeRO keeps one step per group
            flat_state["step"].copy_(max(steps, key=float))


def flatten_optimizer_state(nested: dict) -> dict:
    """``{"state": {fqn: {k: v}}, "param_groups": [{..., "params": [fqn]}]}`` -> the flat form of
    ``get_state_dict(..., flatten_optimizer_state_dict=True)``: ``state.<fqn>.<k>`` and
    ``param_groups.<fqn>.<k>`` (so checkpoints of every layout share their keys)."""
    flat = {f"state.{fqn}.{k}": v for fqn, entries in nested["state"].items() for k, v in entries.items()}
    for group in nested["param_groups"]:
        for fqn in group["params"]:
            flat.update({f"param_groups.{fqn}.{k}": v for k, v in group.items() if k != "params"})
    return flat


def nest_optimizer_state(flat: dict, groups: list[list[str]]) -> dict:
    """The inverse of ``flatten_optimizer_state`` for the given groups of parameter names."""
    state: dict = {}
    hyper: dict = {}
    for key, value in flat.items():
        kind, rest = key.split(".", 1)
        fqn, entry = rest.rsplit(".", 1)
        (state if kind == "state" else hyper).setdefault(fqn, {})[entry] = value
    return {"state": state,
            "param_groups": [{**(hyper.get(names[0], {}) if names else {}), "params": list(names)} for names in groups]}
