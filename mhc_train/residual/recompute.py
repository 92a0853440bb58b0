"""Selective recomputation of the residual-stream ops over blocks of sublayers (mHC section
4.3.2, Table 3, Eq 20).

For every block of L_r consecutive sublayers, backward keeps only the block input x_l0
(nC per token) and each sublayer's output F(.) (C per token). Everything the connection ops and
the sublayer's pre-norm produced (the streams x_l inside the block, H_pre x_l, RMSNorm(H_pre x_l)
and the mappings' intermediates) is dropped after the forward and recomputed in backward by
re-running only those ops, never attention or the experts.

Mechanism: saved-tensor hooks. The forward marks three regions per sublayer (``read``: the
connection's read plus the pre-norm; ``layer``: F; ``write``: the connection's write). Inside
``read``/``write`` every tensor autograd saves is replaced by a handle, except parameters, the
block input and the sublayer outputs. Inside ``layer``, F's saved views of its input (the
normed H_pre x_l) become handles too; F's other saves are kept. The first handle unpacked in
backward re-runs the block's read/write regions from x_l0 and the stored F outputs, recording
what autograd saves in the same order, and hands those tensors out; the block's cache is
dropped once every handle was used. The same code runs, so the recomputed values, and hence the
gradients, are bitwise equal to those of a run without recomputation.

Blocks never cross the ``boundaries`` given (pipeline stage starts): blocks restart at each.
They may span several transformer blocks, hence several FSDP groups: the recompute gathers the
weights of the earlier ones, which FSDP resharded after their forward (``_gather_owners``).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field

import torch

from mhc_train.autocast_state import autocast_context, autocast_state

# The region the forward is in: ("read" | "write", index), ("layer", index, storage key of the
# layer's input) or None. With the observers it lets the memory report attribute every tensor
# kept for backward to the residual-stream maintenance or to attention/experts.
_current_region: list = [None]
_save_observers: list = []


def current_region():
    return _current_region[0]


def _observe_kept(t: torch.Tensor) -> None:
    """Tell observers (the memory report) about a tensor our own hooks keep for backward: an
    outer saved-tensor hook does not see saves that an inner one handles."""
    for observer in _save_observers:
        observer(t, _current_region[0])


def optimal_block_size(n: int, num_sublayers: int) -> int:
    """Eq 20: L_r* = argmin nC ceil(L/L_r) + (n+2) C L_r ~ sqrt(nL / (n+2)), L in sublayers."""
    return max(1, round(math.sqrt(n * num_sublayers / (n + 2))))


def parse_recompute(setting) -> int | str | None:
    """``off``/None/0 -> None, ``auto`` -> "auto", a positive integer (or its string) -> int."""
    if setting is None or setting is False or setting in ("off", "none", "0", 0):
        return None
    if setting == "auto":
        return "auto"
    try:
        value = int(setting)
    except (TypeError, ValueError):
        raise ValueError(f"recompute must be off, auto or a block size >= 1, got {setting!r}") from None
    if value < 1 or str(setting).strip() != str(value):
        raise ValueError(f"recompute must be off, auto or a block size >= 1, got {setting!r}")
    return value


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _allocated(p: torch.Tensor) -> bool:
    """A plain tensor with storage (not a DTensor shard wrapper, not freed by FSDP)."""
    if hasattr(p, "device_mesh") or p.is_meta:
        return False
    try:
        return p.untyped_storage().nbytes() > 0
    except RuntimeError:  # "invalid python storage": FSDP2's unsharded parameter between gathers
        return False


@dataclass
class _Handle:
    block: "_Block"
    key: tuple
    view: tuple | None = None  # (size, stride, storage_offset) for views of a layer input


@dataclass
class _Block:
    input: torch.Tensor
    sublayers: list = field(default_factory=list)  # (index, conn, norm, y)
    owners: list = field(default_factory=list)  # the modules holding those sublayers, in order
    keep: set = field(default_factory=set)  # storage keys kept as they are
    cache: dict | None = None
    layer_inputs: dict = field(default_factory=dict)
    live_handles: int = 0
    ready: object = None  # CUDA event recorded after the recompute
    autocast: list = field(default_factory=autocast_state)  # the forward's, re-entered to recompute

    def new_handle(self, key: tuple, view: tuple | None = None) -> _Handle:
        handle = _Handle(self, key, view)
        self.live_handles += 1
        # The cache lives as long as any handle: autograd drops a saved tensor when its node
        # ran (or, with retain_graph, when the graph goes), so a split backward (input grads,
        # then weight grads) reuses one recompute instead of running it twice.
        weakref.finalize(handle, self._handle_released)
        return handle

    def _handle_released(self) -> None:
        self.live_handles -= 1
        if self.live_handles == 0:
            self.cache, self.layer_inputs, self.ready = None, {}, None

    def recompute(self) -> None:
        """Re-run the read/write regions from the block input; record what autograd saves."""
        recorded: dict = {}
        region = [None]
        counter = [0]

        def record(t):
            recorded[(*region[0], counter[0])] = t
            counter[0] += 1
            return t

        _gather_owners([*self.owners, *(conn for _, conn, _, _ in self.sublayers)])
        with torch.enable_grad(), autocast_context(self.autocast), \
                torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
            x = self.input.detach().requires_grad_(self.input.requires_grad)
            for index, conn, norm, y in self.sublayers:
                region[0], counter[0] = ("read", index), 0
                # the class's read: an FSDP-hooked one would run FSDP's forward hooks in backward
                u, mix = type(conn).read(conn, x)
                a = norm(u)
                self.layer_inputs[index] = a
                region[0], counter[0] = ("write", index), 0
                x = conn.write(x, y.detach().requires_grad_(y.requires_grad), mix)
        self.cache = recorded
        if self.input.is_cuda:  # an overlapped backward may unpack on another stream
            self.ready = torch.cuda.current_stream().record_event()

    def unpack(self, handle: _Handle) -> torch.Tensor:
        if self.cache is None:
            self.recompute()
        if handle.view is None:
            t = self.cache[handle.key]
        else:
            size, stride, offset = handle.view
            t = self.layer_inputs[handle.key[1]].as_strided(size, stride, offset)
        if self.ready is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(self.ready)
            t.record_stream(stream)
        return t


class RecomputePlan:
    """The recompute state of one forward pass (create a new one per forward)."""

    def __init__(self, block_size: int, params, boundaries=(0,)) -> None:
        self.block_size = block_size
        self.boundaries = sorted(set(boundaries) | {0})
        # Parameters are kept, never recomputed. Under FSDP the module's parameters are sharded
        # DTensors or unsharded ones whose storage is not allocated yet when the plan is made: those
        # are recognised as parameters when they are saved (``_is_parameter``).
        self.param_keys = {_storage_key(p) for p in params if _allocated(p)}
        self.blocks: dict[int, _Block] = {}

    def block_start(self, index: int) -> int:
        """First sublayer of the block holding ``index``: blocks restart at every boundary."""
        base = max(b for b in self.boundaries if b <= index)
        return base + (index - base) // self.block_size * self.block_size

    @contextlib.contextmanager
    def read(self, index: int, streams: torch.Tensor):
        start = self.block_start(index)
        if index == start:
            self.blocks[start] = _Block(input=streams, keep={_storage_key(streams)})
        block = self.blocks[start]
        with self._dropping(block, ("read", index)):
            yield

    @contextlib.contextmanager
    def layer(self, index: int, layer_input: torch.Tensor):
        block = self.blocks[self.block_start(index)]
        input_key = _storage_key(layer_input)
        counter = [0]

        def pack(t):
            if _storage_key(t) != input_key:
                _observe_kept(t)
                return t
            counter[0] += 1
            return block.new_handle(("layer", index, counter[0]), (t.size(), t.stride(), t.storage_offset()))

        with _labelled(("layer", index, input_key)), torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield

    @contextlib.contextmanager
    def write(self, index: int, conn, norm, layer_output: torch.Tensor, owner=None):
        """``owner``: the module whose weights ``conn`` and ``norm`` are (a transformer block)."""
        block = self.blocks[self.block_start(index)]
        block.sublayers.append((index, conn, norm, layer_output))
        if owner is not None and (not block.owners or block.owners[-1] is not owner):
            block.owners.append(owner)
        block.keep.add(_storage_key(layer_output))
        with self._dropping(block, ("write", index)):
            yield

    @contextlib.contextmanager
    def _dropping(self, block: _Block, region: tuple):
        counter = [0]

        def pack(t):
            key = (*region, counter[0])
            counter[0] += 1
            storage = _storage_key(t)
            if storage in self.param_keys or storage in block.keep or isinstance(t, torch.nn.Parameter):
                _observe_kept(t)
                return t
            return block.new_handle(key)

        with _labelled(region), torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield


def _gather_owners(owners) -> None:
    """FSDP2 reshards a block's weights after its forward and gathers them again in that block's
    pre-backward, which for every block of a recompute block but the last comes after the
    recompute: gather them here (the blocks, and connections that are FSDP groups of their own).
    ``unshard`` is a no-op for a group already gathered, and FSDP reshards each group after its
    own backward as usual. Every rank recomputes the same blocks in
    the same order, so the all-gathers match."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return
    for owner in owners:
        if isinstance(owner, FSDPModule):
            owner.unshard()


def _unpack(obj):
    return obj.block.unpack(obj) if isinstance(obj, _Handle) else obj


@contextlib.contextmanager
def _labelled(region):
    if torch.compiler.is_compiling():
        # The labels serve eager observers (the memory report, selective checkpointing's policy);
        # inside a compiled block they would be global side effects, which dynamo refuses inside
        # torch.utils.checkpoint's region (train.activation_checkpoint with train.compile).
        yield
        return
    previous = _current_region[0]
    _current_region[0] = region
    try:
        yield
    finally:
        _current_region[0] = previous


class PlainRegions:
    """No recomputation; only labels the regions (for the memory report)."""

    @contextlib.contextmanager
    def read(self, index, streams):
        with _labelled(("read", index)):
            yield

    @contextlib.contextmanager
    def layer(self, index, layer_input):
        # The storage key lets the memory report tell the layer's input apart; a compiled block
        # labels nothing (``_labelled``), and data_ptr would be a graph break there.
        key = None if torch.compiler.is_compiling() else _storage_key(layer_input)
        with _labelled(("layer", index, key)):
            yield

    @contextlib.contextmanager
    def write(self, index, conn, norm, layer_output, owner=None):
        with _labelled(("write", index)):
            yield
