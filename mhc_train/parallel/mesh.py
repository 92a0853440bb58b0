"""The N-D device mesh: parallel degrees -> one ``DeviceMesh``, the rules that combine them, and
each rank's roles.

    world = pp x dp_replicate x dp_shard          (pp outermost, then the data dimensions)
    dp_shard = dp_shard_mod_ep x ep               (ep is borrowed from the sharded data ranks)

- ``pp``: pipeline stages (``mhc_train.parallel.pipeline``); one pipeline per data rank.
- ``dp_replicate`` x ``dp_shard``: the data ranks (each reads its own part of the batch);
  parameters other than the routed experts are replicated over ``dp_replicate`` and sharded
  over ``dp_shard`` (FSDP2; HSDP when both are > 1).
- ``ep``: routed experts sharded over ``ep`` consecutive data ranks (``expert_parallel``);
  each expert is then replicated over ``dp_replicate`` and FSDP-sharded over
  ``dp_shard_mod_ep`` (torchtitan's EP-within-DP).

The mesh's dimensions are ``("pp", "dp_replicate", "dp_shard_mod_ep", "ep")``, with flattened
views ``dp_shard`` and ``dp`` (all data ranks). EP is innermost so that its all-to-all stays
within a node whenever ``ep`` <= GPUs per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

DEGREE_KEYS = ("pp", "dp_replicate", "dp_shard", "ep")
MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep")


class MeshConfigError(ValueError):
    """An impossible combination of parallel degrees; the message starts with the key."""


def _bad(key: str, reason: str):
    raise MeshConfigError(f"{key}: {reason}")


@dataclass(frozen=True)
class MeshDegrees:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard

    @property
    def dp(self) -> int:
        """Data ranks: each reads its own part of the batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.ep

    @property
    def expert_dp(self) -> int:
        """Copies of each expert shard (data ranks / ep): replicated x FSDP-sharded."""
        return self.dp_replicate * self.dp_shard_mod_ep

    def describe(self) -> str:
        return " x ".join(f"{k}={getattr(self, k)}" for k in DEGREE_KEYS if getattr(self, k) > 1) or "1 process"


def resolve_degrees(world: int, pp: int = 1, dp_replicate: int = 1, dp_shard: int = -1, ep: int = 1, *,
                    n_routed_experts: int | None = None, has_moe: bool = True,
                    prefix: str = "parallel") -> MeshDegrees:
    """The degrees with ``-1`` ("what is left of the world") filled in, or ``MeshConfigError``
    naming the key and the rule. Pipeline-specific rules (stages vs blocks, micro-batches) are
    ``pipeline.validate_pipeline``'s, with ``pp`` as its world size."""
    given = {"pp": pp, "dp_replicate": dp_replicate, "dp_shard": dp_shard, "ep": ep}
    for key, value in given.items():
        if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
            _bad(f"{prefix}.{key}", f"must be an integer >= 1, or -1 for what is left of the world, got {value!r}")
    if ep == -1:
        _bad(f"{prefix}.ep", "must be given (an integer >= 1): it is borrowed from dp_shard, not a share of the world")
    free = [k for k in ("pp", "dp_replicate", "dp_shard") if given[k] == -1]
    if len(free) > 1:
        _bad(f"{prefix}.{free[1]}", f"only one degree may be -1, got -1 for {' and '.join(free)}")
    fixed = 1
    for k in ("pp", "dp_replicate", "dp_shard"):
        if given[k] != -1:
            fixed *= given[k]
    if free:
        if world % fixed:
            _bad(f"{prefix}.{free[0]}", f"the world of {world} ranks is not a multiple of the other degrees' "
                 f"product {fixed} ({_product(given)})")
        given[free[0]] = world // fixed
    degrees = MeshDegrees(**given)
    if degrees.world != world:
        _bad(prefix, f"{_product(given)} = {degrees.world} ranks, but the world has {world} "
             "(set one degree to -1 to take what is left)")
    if degrees.dp_shard % degrees.ep:
        _bad(f"{prefix}.ep", f"{degrees.ep} must divide dp_shard={degrees.dp_shard}: expert-parallel ranks are "
             "borrowed from the sharded data ranks")
    if degrees.ep > 1:
        if not has_moe:
            _bad(f"{prefix}.ep", f"{degrees.ep}, but the model has no MoE layer (model.n_layers <= model.n_dense_layers)")
        if n_routed_experts is not None and n_routed_experts % degrees.ep:
            _bad(f"{prefix}.ep", f"{degrees.ep} must divide model.n_routed_experts={n_routed_experts} "
                 "(each expert-parallel rank holds the same number of experts)")
    return degrees


def _product(given: dict[str, int]) -> str:
    return " x ".join(f"{k}={given[k]}" for k in ("pp", "dp_replicate", "dp_shard"))


@dataclass
class ParallelMesh:
    """The built mesh and this rank's place in it (``build_mesh``)."""

    degrees: MeshDegrees
    mesh: object | None  # DeviceMesh over MESH_DIMS, None for one process

    def _sub(self, *names: str):
        return self.mesh[names if len(names) > 1 else names[0]] if self.mesh is not None else None

    def _coordinate(self, name: str) -> int:
        return self.mesh.get_local_rank(name) if self.mesh is not None else 0

    @property
    def pp_rank(self) -> int:
        return self._coordinate("pp")

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data ranks (which part of the batch it reads)."""
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    def group(self, name: str) -> dist.ProcessGroup | None:
        """Process group of one dimension or flattened view (pp, dp, ep, ...); None for one process."""
        return self.mesh[name].get_group() if self.mesh is not None else None

    def data_mesh(self):
        """The mesh FSDP2 puts non-expert parameters on: ``(dp_replicate, dp_shard)`` (HSDP; a shard
        size of 1 is plain replication) or ``dp_shard``; None with one data rank."""
        return self._fsdp_mesh("dp_shard", self.degrees.dp_shard)

    def expert_data_mesh(self):
        """The mesh FSDP2 puts each expert shard on (the data ranks outside its EP group):
        ``(dp_replicate, dp_shard_mod_ep)`` or ``dp_shard_mod_ep``; None when the EP group holds
        every copy."""
        return self._fsdp_mesh("dp_shard_mod_ep", self.degrees.dp_shard_mod_ep)

    def _fsdp_mesh(self, shard_dim: str, shard_size: int):
        if self.mesh is None or self.degrees.dp_replicate * shard_size == 1:
            return None
        return self._sub("dp_replicate", shard_dim) if self.degrees.dp_replicate > 1 else self._sub(shard_dim)

    def ep_mesh(self):
        return self._sub("ep") if self.mesh is not None and self.degrees.ep > 1 else None


def build_mesh(degrees: MeshDegrees, device_type: str) -> ParallelMesh:
    """One ``DeviceMesh`` over MESH_DIMS (every dimension present, size 1 included) with the
    flattened views ``dp_shard`` and ``dp``; no mesh for one process."""
    if degrees.world == 1:
        return ParallelMesh(degrees, None)
    from torch.distributed.device_mesh import init_device_mesh

    shape = (degrees.pp, degrees.dp_replicate, degrees.dp_shard_mod_ep, degrees.ep)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    mesh["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp")
    return ParallelMesh(degrees, mesh)


__all__ = ["DEGREE_KEYS", "MESH_DIMS", "MeshConfigError", "MeshDegrees", "ParallelMesh", "build_mesh",
           "resolve_degrees"]
