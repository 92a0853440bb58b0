"""DeepSeek-V3's auxiliary-loss-free load balancing, as the trainer runs it, in one place.

Each router counts the tokens it sends to each expert during the step's forwards (``Router``:
``expert_load``, not again in a recomputation). After the step's backward:

    loads()                 summed over the ranks that route to the same experts (the layout
                            knows which), so every rank's update equals one process's; returns
                            the imbalance metric (max / mean load, mean and max over layers)
    optimizer.step()        -> the registered post-hook moves each bias by
                               speed * sign(mean load - load) and clears the loads
    or, on a skipped step,  discard(): the loads of a step that did not update must not move the biases

The bias update is an optimizer step hook, so it happens exactly when the weights change, under
any engine (our AdamW is the optimizer DeepSpeed's ZeRO steps too); ``check_updated`` turns an
engine that stepped without calling it into an error instead of silently frozen biases.
"""

from __future__ import annotations

import torch


class RouterBalance:
    def __init__(self, model, layout, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.layout = layout
        self.routers = [m.router for m in model.moe_layers()]
        self._armed, self._updates = False, 0
        optimizer.register_step_post_hook(self._after_optimizer_step)

    def loads(self) -> dict[str, float]:
        """Sum this step's loads over the ranks (for the update and the metric); the metric."""
        self._armed, self._updates = True, 0
        loads = self.layout.reduce_router_loads(self.routers)
        imbalance = [float(load.max() / load.mean()) for load in loads if float(load.sum()) > 0]
        if not imbalance:
            return {}
        return {"load_imbalance": sum(imbalance) / len(imbalance), "load_imbalance_max": max(imbalance)}

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        # Only the step loads() prepared: torch.distributed.checkpoint also steps the optimizer
        # (with zero gradients, to create its state) when a checkpoint is loaded.
        if self._armed:
            self.model.update_router_biases()  # loads already summed over the ranks by loads()
            self._armed = False
            self._updates += 1

    def discard(self) -> None:
        self._armed = False
        for r in self.routers:
            if not r.expert_load.is_meta:
                r.expert_load.zero_()

    def check_updated(self) -> None:
        """After a step the layout reports applied: the hook must have run once since loads()."""
        if self.routers and self._updates != 1:
            raise RuntimeError(f"the optimizer step ran its router-bias hook {self._updates} times, not once: "
                               "the engine steps another optimizer than the one the hook is registered on")
