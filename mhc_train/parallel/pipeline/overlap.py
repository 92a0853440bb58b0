"""DualPipe-style overlap of a forward and a backward chunk, on torch's DualPipeV runtime.

torch's ``ScheduleDualPipeV`` pairs, in its main phase, the forward chunk of one micro-batch with
the backward chunk of another as one ``OVERLAP_F_B`` action whose ``sub_actions`` are
(FORWARD on stage a, FULL_BACKWARD on stage b). Without a handler the runtime runs them one
after the other. ``OverlapFBHandler`` is registered for that action
(``schedule.register_custom_function(OVERLAP_F_B, handler)``) and runs the pair overlapped.

``phases`` (the default, CPU and CUDA): the chunks are cut into phases at their communication
points and interleaved (``mhc_train.parallel.phases.PairTurns``): the backward chunk starts (its
output gradient received); at each asynchronous expert all-to-all a chunk hands the turn to the
other and waits for its collective only when the turn comes back. The forward chunk waits for its
pipeline receive when it first gets the turn (the receive travelled during the backward chunk's
first phase), and each chunk posts its pipeline send as soon as it finishes, in the runtime's
order of sends (the forward's first), instead of after the pair. On CUDA the forward chunk also
runs on the other stream (below). Results are bitwise those of the sequential pair on CPU.

``threads`` (the earlier mechanism; CUDA ``auto`` before phases):

    CUDA:  wait for both chunks' received tensors (on the compute stream)
           forward chunk  -> a worker thread, on the stream the backward chunk does NOT use
           backward chunk -> this thread (autograd runs each backward op on the stream its
                             forward op ran on, so the backward chunk's stream is the one its
                             micro-batch's forward used; the handler remembers that per
                             (stage, micro-batch) and puts the new forward on the other stream)
           join; compute stream waits for both streams; cross-stream tensors record_stream'd
    CPU:   forward chunk, then backward chunk, in this thread: exactly the runtime's own order,
           so losses and gradients are bitwise those of the schedule without the handler.

The per-action work (waiting for receives, ``forward_one_chunk`` + loss, ``backward_one_chunk``
with the runtime's backward counter, local hand-over between the two stages of one rank in the
V) mirrors the runtime's ``_perform_action``, which is local to ``_step_microbatches`` and cannot
be called; it uses the stage's public methods and the schedule state the context exposes.

Optionally (``post_res_regions``, CUDA only), the FFN sublayer's post-res merge
``H_res x + H_post^T y`` runs on a high-priority stream (mHC paper section 4.3.3), entered through
the model's sublayer regions (``Block._sublayer``'s ``regions.write``), with ``record_stream``
on every tensor that crosses streams.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    _Action,
    _PipelineContext,
    _wait_batch_p2p,
)
from torch.distributed.pipelining.schedules import _batch_p2p
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from mhc_train.autocast_state import autocast_context, autocast_state
from mhc_train.parallel.phases import PairTurns

CONCURRENCY = ("auto", "sequential", "threads", "phases")


class OverlapFBHandler:
    """Runs DualPipeV's OVERLAP_F_B actions (see the module docstring).

    concurrency: ``auto`` = ``phases``; ``phases`` = the chunks take turns at their communication
    points (module docstring); ``sequential`` = always one after the other (CUDA: still on two
    streams, so the GPU may overlap what the CPU has queued); ``threads`` = the forward chunk in a
    worker thread running freely beside the backward one (CUDA: on the other stream; sequential
    launch when a stage is wrapped by FSDP/DDP, whose collectives must keep one order on every
    rank; on CPU used by the tests to exercise the concurrent path).

    ``record_phases``: keep each pair's order of phases and collectives in ``pair_events``.
    """

    def __init__(self, concurrency: str = "auto") -> None:
        if concurrency not in CONCURRENCY:
            raise ValueError(f"parallel.pipeline.overlap_concurrency: must be one of {CONCURRENCY}, "
                             f"got {concurrency!r}")
        self.concurrency = "phases" if concurrency == "auto" else concurrency
        self.record_phases = False
        self.pair_events: list[dict] = []  # with record_phases: per pair, its actions and events
        self._early_sends: list = []  # pipeline sends posted inside pairs, waited at the step's end
        self._sent_early: set[tuple[str, int, int]] = set()
        self.return_outputs = True
        self.loss_kwargs = None
        self.pairs_run = 0  # OVERLAP_F_B actions handled (all steps)
        self._side_streams: dict = {}
        self._forward_stream: dict[tuple[int, int], object] = {}  # (stage, mb) -> stream its forward ran on

    # ------------------------------------------------------------------ installation

    def install(self, schedule) -> None:
        """Register for OVERLAP_F_B and learn each step's ``return_outputs``/``loss_kwargs``
        (the runtime passes them to its own per-action code only)."""
        schedule.register_custom_function(OVERLAP_F_B, self)
        original = schedule._step_microbatches
        handler = self

        def step_microbatches(arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None, return_outputs=True,
                              loss_kwargs=None):
            handler.return_outputs = return_outputs
            handler.loss_kwargs = loss_kwargs
            handler._forward_stream.clear()
            try:
                return original(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs, loss_kwargs=loss_kwargs)
            finally:  # the runtime waits for its own sends before leaving the step: so for ours
                for works in handler._early_sends:
                    for work in works:
                        work.wait()
                handler._early_sends.clear()

        schedule._step_microbatches = step_microbatches
        for stage in schedule._stages:  # a send posted inside a pair is not posted again by the runtime
            for kind in ("fwd", "bwd"):
                original_ops = getattr(stage, f"get_{kind}_send_ops")
                setattr(stage, f"get_{kind}_send_ops", self._skip_if_sent(kind, stage.stage_index, original_ops))

    def _skip_if_sent(self, kind: str, stage_index: int, get_ops):
        def get_send_ops(mb: int):
            key = (kind, stage_index, mb)
            if key in self._sent_early:
                self._sent_early.discard(key)
                return []
            return get_ops(mb)

        return get_send_ops

    # ---------------------------------------------------------------------- the action

    def __call__(self, action: _Action, ctx: _PipelineContext) -> None:
        schedule = ctx.schedule_ref
        subs = action.sub_actions or ()
        forwards = [a for a in subs if a.computation_type == FORWARD]
        backwards = [a for a in subs if a.computation_type in (FULL_BACKWARD, BACKWARD_INPUT)]
        if len(subs) != 2 or len(forwards) != 1 or len(backwards) != 1:
            for sub in subs:  # not an F&B pair: run as the runtime would
                self.run_sub_action(sub, ctx)
            return
        f_action, b_action = forwards[0], backwards[0]
        stages = _stages_by_index(schedule)
        f_stage = stages[f_action.stage_index]

        if self.concurrency == "phases":  # the forward chunk waits for its receive when it starts
            self._wait_received(schedule, b_action, stages)
            if f_stage.device.type != "cuda":
                self._run_pair_phases(f_action, b_action, ctx, stages)
            else:
                self._run_pair_cuda(f_action, b_action, ctx, stages, f_stage.device)
            self.pairs_run += 1
            return
        # Receives first, on this thread's current stream (the runtime waits for them the same way).
        self._wait_received(schedule, f_action, stages)
        self._wait_received(schedule, b_action, stages)

        if f_stage.device.type != "cuda":
            if self.concurrency == "threads":
                self._run_pair_threaded(f_action, b_action, ctx, stages)
            else:
                for sub in subs:  # the runtime's order: bitwise the same results
                    self._compute(sub, ctx, stages)
        else:
            self._run_pair_cuda(f_action, b_action, ctx, stages, f_stage.device)
        self.pairs_run += 1

    def run_sub_action(self, action: _Action, ctx: _PipelineContext) -> None:
        stages = _stages_by_index(ctx.schedule_ref)
        self._wait_received(ctx.schedule_ref, action, stages)
        self._compute(action, ctx, stages)

    # ------------------------------------------------------------------- the pair runs

    def _run_pair_threaded(self, f_action, b_action, ctx, stages, forward_context=contextlib.nullcontext):
        """The forward chunk in a worker thread, the backward chunk here; joined before return."""
        error: list[BaseException] = []
        grad_enabled = torch.is_grad_enabled()
        autocast = autocast_state()

        def run_forward():
            try:
                with torch.set_grad_enabled(grad_enabled), autocast_context(autocast), forward_context():
                    self._compute(f_action, ctx, stages)
            except BaseException as exc:  # re-raised in the calling thread
                error.append(exc)

        name = f"pp-forward-{f_action.stage_index}-{f_action.microbatch_index}"
        worker = threading.Thread(target=run_forward, name=name)
        worker.start()
        try:
            self._compute(b_action, ctx, stages)
        finally:
            worker.join()
        if error:
            raise error[0]

    def _run_pair_phases(self, f_action, b_action, ctx, stages, forward_context=contextlib.nullcontext):
        """The chunks take turns at their communication points (``PairTurns``); each posts its
        pipeline send as soon as it is done, in the runtime's order (the forward chunk's first)."""
        schedule = ctx.schedule_ref
        turns = PairTurns(record=self.record_phases)
        grad_enabled = torch.is_grad_enabled()
        autocast = autocast_state()
        sends = _InOrderSends(self, stages, f_action, b_action)

        def forward():
            with torch.set_grad_enabled(grad_enabled), autocast_context(autocast), forward_context():
                self._wait_received(schedule, f_action, stages)
                turns.note("F", "received")
                self._compute(f_action, ctx, stages)
            sends.done("F")

        def backward():
            self._compute(b_action, ctx, stages)
            sends.done("B")

        turns.run(forward, backward)
        if self.record_phases:
            self.pair_events.append({"forward": (f_action.stage_index, f_action.microbatch_index),
                                     "backward": (b_action.stage_index, b_action.microbatch_index),
                                     "events": turns.events})

    def _run_pair_cuda(self, f_action, b_action, ctx, stages, device) -> None:
        compute = torch.cuda.current_stream(device)
        side = self._side_stream(device)
        b_key = (b_action.stage_index, b_action.microbatch_index)
        b_stream = self._forward_stream.pop(b_key, compute)
        f_stream = side if b_stream == compute else compute
        f_stage = stages[f_action.stage_index]

        f_stream.wait_stream(compute)  # received inputs and earlier work are ready
        if f_stream != compute:
            for t in _stage_inputs(f_stage, f_action.microbatch_index):
                t.record_stream(f_stream)

        @contextlib.contextmanager
        def on_forward_stream():  # the device too: a new thread starts on device 0
            with torch.cuda.device(device), torch.cuda.stream(f_stream):
                yield

        # Data-parallel wrappers issue collectives from inside forward (FSDP unshard) and backward
        # (gradient reduction): from two free threads their order could differ between ranks
        # (taking turns keeps it).
        sequential = self.concurrency == "sequential" or (
            self.concurrency == "threads" and any(_data_parallel_wrapped(s) for s in stages.values()))
        if self.concurrency == "phases":
            self._run_pair_phases(f_action, b_action, ctx, stages, on_forward_stream)
        elif sequential:
            with on_forward_stream():
                self._compute(f_action, ctx, stages)
            self._compute(b_action, ctx, stages)
        else:
            self._run_pair_threaded(f_action, b_action, ctx, stages, on_forward_stream)

        self._forward_stream[(f_action.stage_index, f_action.microbatch_index)] = f_stream
        compute.wait_stream(f_stream)
        compute.wait_stream(side)
        if f_stream != compute:  # what the forward made is used on the compute stream from now on
            made = _stage_outputs(f_stage, f_action.microbatch_index)
            if f_stage.is_last and ctx.schedule_ref._internal_losses:
                made.append(ctx.schedule_ref._internal_losses[-1])
            for t in made:
                t.record_stream(compute)

    def _side_stream(self, device):
        key = torch.device(device)
        if key not in self._side_streams:
            self._side_streams[key] = torch.cuda.Stream(device=key)
        return self._side_streams[key]

    # ----------------------------------------------------- one sub-action (the runtime's)

    def _wait_received(self, schedule, action: _Action, stages) -> None:
        idx, mb = action.stage_index, action.microbatch_index
        stage = stages[idx]
        kind = action.computation_type
        if kind == FORWARD:
            if not stage.is_first and idx - 1 not in stages:
                ops = schedule.fwd_recv_ops.pop((idx, mb), None)
                if ops is None:
                    raise AssertionError(f"Computing {action} before receiving its input")
                _wait_batch_p2p(ops)
        elif kind in (FULL_BACKWARD, BACKWARD_INPUT):
            if not stage.is_last and idx + 1 not in stages:
                ops = schedule.bwd_recv_ops.pop((idx, mb), None)
                if ops is None:
                    raise AssertionError(f"Computing {action} before receiving its output gradient")
                _wait_batch_p2p(ops)

    def _compute(self, action: _Action, ctx: _PipelineContext, stages) -> None:
        schedule = ctx.schedule_ref
        idx, mb = action.stage_index, action.microbatch_index
        stage = stages[idx]
        kind = action.computation_type
        schedule._assert_unsharded(stage)
        if kind == FORWARD:
            output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb],
                                             save_forward_output=self.return_outputs)
            schedule._maybe_compute_loss(stage, output, ctx.target_mbs, mb, self.loss_kwargs)
            if idx + 1 in stages:  # V: the next stage is on this rank, hand over without comms
                stages[idx + 1].set_local_fwd_input(output, mb)
        elif kind in (FULL_BACKWARD, BACKWARD_INPUT):
            full = kind == FULL_BACKWARD
            loss = schedule._maybe_get_loss(stage, mb)
            last_backward = False
            if full:
                schedule.backward_counter[idx] += 1
                last_backward = schedule.backward_counter[idx] == schedule._n_microbatches
            stage.backward_one_chunk(mb, loss=loss, full_backward=full, last_backward=last_backward)
            if idx - 1 in stages:
                stages[idx - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)
        elif kind == BACKWARD_WEIGHT:
            schedule.backward_counter[idx] += 1
            last_backward = schedule.backward_counter[idx] == schedule._n_microbatches
            stage.backward_weight_one_chunk(mb, last_backward=last_backward)
        else:
            raise ValueError(f"OverlapFBHandler cannot run sub-action {action}")


class _InOrderSends:
    """Posts the pair's pipeline sends as each chunk finishes, never out of the runtime's order
    (it lowers a pair's sends as the forward chunk's, then the backward chunk's; both may go to
    the same peer, where messages match in posting order)."""

    def __init__(self, handler: OverlapFBHandler, stages, f_action, b_action) -> None:
        self.handler, self.stages = handler, stages
        self.pending = {"F": ("fwd", f_action), "B": ("bwd", b_action)}
        self.finished: set[str] = set()

    def done(self, chunk: str) -> None:
        self.finished.add(chunk)
        for c in ("F", "B"):
            if c not in self.finished:
                return  # the runtime's order: nothing after a chunk still running
            if c in self.pending:
                self._post(*self.pending.pop(c))

    def _post(self, kind: str, action) -> None:
        idx, mb = action.stage_index, action.microbatch_index
        stage = self.stages[idx]
        neighbour = idx + 1 if kind == "fwd" else idx - 1
        if (stage.is_last if kind == "fwd" else stage.is_first) or neighbour in self.stages:
            return  # no send: the end of the pipeline, or a local hand-over in the V
        works = _batch_p2p(getattr(stage, f"get_{kind}_send_ops")(mb))
        self.handler._sent_early.add((kind, idx, mb))
        self.handler._early_sends.append(works)


def _data_parallel_wrapped(stage) -> bool:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(stage.submod, (FSDPModule, DistributedDataParallel))


def _stages_by_index(schedule) -> dict:
    return {stage.stage_index: stage for stage in schedule._stages}


def _stage_inputs(stage, mb: int) -> list[torch.Tensor]:
    if stage.is_first:
        return []
    return [info.buffer for info in stage.args_recv_info[mb] if isinstance(info.buffer, torch.Tensor)]


def _stage_outputs(stage, mb: int) -> list[torch.Tensor]:
    cached = stage.fwd_cache.get(mb)
    return [t for t in (cached[0] if cached else ()) if isinstance(t, torch.Tensor)]


# --------------------------------------------------- high-priority post-res merge stream


class _RecordStreams(TorchFunctionMode):
    """Inside the post-res region: inputs are used on ``used_on``, outputs later on ``consumer``."""

    def __init__(self, used_on, consumer) -> None:
        super().__init__()
        self.used_on, self.consumer = used_on, consumer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(self.used_on)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(self.consumer)
        return out


_high_priority_streams: dict = {}


def high_priority_stream(device):
    key = torch.device(device)
    if key not in _high_priority_streams:
        _, highest = torch.cuda.Stream.priority_range()
        _high_priority_streams[key] = torch.cuda.Stream(device=key, priority=highest)
    return _high_priority_streams[key]


class _PostResRegions:
    """Wraps the model's sublayer regions (``PlainRegions`` or a ``RecomputePlan``): the write
    region of every FFN sublayer (odd sublayer index) runs on the high-priority stream."""

    def __init__(self, inner, stream) -> None:
        self.inner, self.stream = inner, stream

    def read(self, index, streams):
        return self.inner.read(index, streams)

    def layer(self, index, layer_input):
        return self.inner.layer(index, layer_input)

    @contextlib.contextmanager
    def write(self, index, conn, norm, layer_output, owner=None):
        if index % 2 == 0:
            with self.inner.write(index, conn, norm, layer_output, owner):
                yield
            return
        current = torch.cuda.current_stream(layer_output.device)
        self.stream.wait_stream(current)
        with self.inner.write(index, conn, norm, layer_output, owner), torch.cuda.stream(self.stream), \
                _RecordStreams(self.stream, current):
            yield
        current.wait_stream(self.stream)


def post_res_regions(inner, device):
    return _PostResRegions(inner, high_priority_stream(device))


__all__ = ["CONCURRENCY", "OverlapFBHandler", "high_priority_stream", "post_res_regions"]
