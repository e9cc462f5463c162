"""Replay of an ultralytics model's forward as one recorded operator sequence (CPU inference).

A converted yolo11n forward walks ~140 ``nn.Module`` calls and the blocks' own Python code to
make ~230 operator calls, the same ones on every call once the input's shape is fixed. So, once
a model has run the same input signature (shape, strides, dtype, device) outside autograd for
:data:`CAPTURE_AFTER_SECONDS` (and at least :data:`CAPTURE_AFTER` calls), its forward is
recorded at the operator level (``torch.fx``'s ``make_fx`` on real tensors: the ATen and
``dsconv_ext`` operators the forward calls, with their arguments) into a ``GraphModule`` whose
generated code makes those calls in order; later calls with that signature run it instead of
the module tree (0.6-0.9 ms less per 640 px yolo11n forward on an AMD Zen 4, of 23 ms at two
threads and 39 ms at one). That graph is then traced into TorchScript, whose interpreter makes
the same calls from C++ without the generated Python in between (3-14% less again on the same
machine in a same-model A/B; ``_torchscript_runner``); where tracing fails or its replay
differs, or with ``DSCONV_EXT_CAPTURE=fx``, the fx graph itself replays.

The recorded graph calls the same operators on the same tensors with the same arguments in the
same order, so its outputs are bit-identical to the eager forward: this is checked once, when the
graph is recorded (its outputs, and the TorchScript replay's, against an eager call's, exactly),
and a graph that differs is dropped. Weights are referenced, not copied: an in-place update
(``load_state_dict``) is seen.

Refused (the forward stays eager for that signature; :func:`capture_report` says why): control
flow that reads tensor values (``make_fx`` raises), operators whose output shape depends on
values (``nonzero``, boolean masks), any error while recording. Not used with autograd on, in
training mode, under tracing / scripting / ONNX export / ``torch.compile``, with ``profile`` or
``embed``, for non-CPU tensors or tensor subclasses, or with ``DSCONV_EXT_CAPTURE=0``.

Recording costs 0.6-2 s (an eager run, the trace, checking replays), which a 25 ms forward
earns back after 1000-3000 calls: hence the wait, so that a short job (a folder of images, a
validation run over many letterboxed shapes) never pays it and a stream pays it once.
``DSCONV_EXT_CAPTURE_AFTER_S`` sets the wait in seconds (0: record on the third call, as the
benchmarks do).

Recorded graphs are dropped when the model's tensors move or change dtype (``.to()``, ``.half()``;
``_apply``), when any module, parameter or buffer is registered anywhere in the process (a layer
replaced, a buffer added: process-wide registration hooks), and are never pickled or deep-copied.
Other edits of a module's plain attributes after a graph was recorded (``Detect.export = True``,
a layer's stride) are not seen: call :func:`clear_captures` after such edits.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree
from ultralytics.nn import tasks

__all__ = [
    "CAPTURE_AFTER",
    "CAPTURE_AFTER_SECONDS",
    "CAPTURE_MODES",
    "ENV_VAR",
    "CapturedForward",
    "capture_mode",
    "capture_report",
    "clear_captures",
    "use_graph_capture",
]

ENV_VAR = "DSCONV_EXT_CAPTURE"
AFTER_ENV_VAR = "DSCONV_EXT_CAPTURE_AFTER_S"
# A signature is recorded once it has taken CAPTURE_AFTER_SECONDS of eager forwards over at least
# CAPTURE_AFTER calls (the third call at the earliest: the first two settle per-shape state).
CAPTURE_AFTER = 3
CAPTURE_AFTER_SECONDS = 10.0
MAX_GRAPHS = 8  # recorded signatures per model
MAX_SEEN = 64  # signatures counted per model before the counts restart

# Bumped whenever a module, parameter or buffer is registered anywhere: recorded graphs reference
# the modules' tensors as they were, so any such change drops them.
_epoch = [0]


def _bump_epoch(*_args):
    _epoch[0] += 1


nn.modules.module.register_module_module_registration_hook(_bump_epoch)
nn.modules.module.register_module_parameter_registration_hook(_bump_epoch)
nn.modules.module.register_module_buffer_registration_hook(_bump_epoch)


# DSCONV_EXT_CAPTURE: what each value does (also what `python -m dsconv_ext info` reports).
CAPTURE_MODES = {
    "1": "on (replayed by TorchScript where the graph traces, else by torch.fx)",
    "fx": "on (replayed by torch.fx: DSCONV_EXT_CAPTURE=fx)",
    "0": "off (DSCONV_EXT_CAPTURE=0)",
}


def capture_mode() -> str:
    """``DSCONV_EXT_CAPTURE`` (default ``"1"``), checked against :data:`CAPTURE_MODES`."""
    raw = os.environ.get(ENV_VAR, "1")
    if raw not in CAPTURE_MODES:
        raise ValueError(
            f"{ENV_VAR} must be 0, 1 or fx, got {raw!r} (0: no recorded graphs; 1: the default; "
            f"fx: replay the fx graph, not TorchScript)"
        )
    return raw


def _enabled() -> bool:
    return capture_mode() != "0"


def _after_seconds() -> float:
    raw = os.environ.get(AFTER_ENV_VAR)
    if raw is None:
        return CAPTURE_AFTER_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ValueError(f"{AFTER_ENV_VAR} must be a number of seconds >= 0, got {raw!r}")
    return value


def _replay_allowed(model: nn.Module, x) -> bool:
    return (
        type(x) is torch.Tensor
        and not model.training
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
        and _enabled()
    )


class _Captures:
    """Per model: recorded graphs by input signature (False where refused), and per signature
    not yet recorded its eager calls and the seconds they took."""

    def __init__(self, model: nn.Module) -> None:
        self.epoch = _epoch[0]
        self.modules = list(model.modules())
        self.graphs: Dict[tuple, object] = {}
        self.refused: Dict[tuple, str] = {}
        self.engines: Dict[tuple, str] = {}
        self.seen: Dict[tuple, tuple] = {}
        self.lock = threading.Lock()


def _hooked(modules) -> bool:
    """Whether a forward hook would run: a graph replays operators, not module calls."""
    mm = nn.modules.module
    if mm._global_forward_hooks or mm._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _signature(x: torch.Tensor) -> tuple:
    return (tuple(x.shape), x.stride(), x.dtype, x.device)


def _value_dependent(gm) -> Optional[str]:
    """Why replaying ``gm`` could differ from the eager forward on other input values, or None."""
    tags = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if any(t in getattr(node.target, "tags", ()) for t in tags):
            return f"operator {node.target} has a value-dependent output"
    return None


def _identical(a, b) -> bool:
    """Same structure, and every tensor the same shape, dtype and values (NaN equal to NaN)."""
    fa, sa = pytree.tree_flatten(a)
    fb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    for u, v in zip(fa, fb):
        if not isinstance(u, torch.Tensor) or not isinstance(v, torch.Tensor):
            if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor) or u != v:
                return False
        elif u.shape != v.shape or u.dtype != v.dtype:
            return False
        elif not torch.equal(u, v):
            if not u.is_floating_point():
                return False
            if not bool(((u == v) | (torch.isnan(u) & torch.isnan(v))).all()):
                return False
    return True


class _FlatOutputs(nn.Module):
    """A recorded graph with its outputs as a flat tuple: what ``torch.jit.trace`` can return."""

    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, x):
        return tuple(pytree.tree_flatten(self.gm(x))[0])


def _torchscript_runner(gm: nn.Module, x: torch.Tensor, y_ref):
    """``gm`` traced into TorchScript, whose interpreter makes the operator calls from C++ instead
    of the generated Python (0.86-0.97x the time of a 640 px yolo11n forward at two threads on a
    Zen 4, same-model A/B), run without the graph executor's optimisation passes so that it is
    the traced graph, checked bit-identical to ``y_ref``; None where tracing fails (a PyTorch
    without ``torch.jit``, an output that is not all tensors), the replay differs, or
    ``DSCONV_EXT_CAPTURE=fx``."""
    if capture_mode() == "fx":
        return None
    flat, spec = pytree.tree_flatten(y_ref)
    if not flat or not all(type(t) is torch.Tensor for t in flat):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice
            traced = torch.jit.trace(_FlatOutputs(gm), x, check_trace=False)

        def run(t):
            with torch.jit.optimized_execution(False):  # thread-local
                return pytree.tree_unflatten(list(traced(t)), spec)

        return run if _identical(run(x), y_ref) else None
    except Exception:
        return None


class CapturedForward:
    """Mixin over an ultralytics model class: ``_predict_once`` replays a recorded graph where one
    applies (see the module docstring), else runs the inherited forward."""

    # (*args: ultralytics 8.3 passes profile, visualize, embed; later versions profile, embed)
    def _predict_once(self, x, *args, **kwargs):
        eager = super()._predict_once
        if any(args) or any(kwargs.values()) or not _replay_allowed(self, x):
            return eager(x, *args, **kwargs)
        state = self.__dict__.get("_dsconv_captures")
        if state is None or state.epoch != _epoch[0]:
            state = self.__dict__["_dsconv_captures"] = _Captures(self)
        if _hooked(state.modules):
            return eager(x)
        key = _signature(x)
        graph = state.graphs.get(key)
        if graph is not None:
            return graph(x) if graph else eager(x)
        if len(state.graphs) >= MAX_GRAPHS:
            return eager(x)
        if len(state.seen) >= MAX_SEEN:
            state.seen.clear()
        calls, seconds = state.seen.get(key, (0, 0.0))
        if calls + 1 < CAPTURE_AFTER or seconds < _after_seconds():
            t0 = time.perf_counter()
            y = eager(x)
            state.seen[key] = (calls + 1, seconds + time.perf_counter() - t0)
            return y
        with state.lock:
            if key in state.graphs:  # another thread recorded it meanwhile
                graph = state.graphs[key]
                return graph(x) if graph else eager(x)
            return self._record(state, key, x)

    def _record(self, state: _Captures, key: tuple, x: torch.Tensor):
        from torch.fx.experimental.proxy_tensor import make_fx

        base = super()._predict_once
        reason, y_eager = None, None
        try:
            # An eager run first: state a layer keeps per input shape (the Detect head's anchors)
            # is then this shape's, and enters the graph as constants.
            y_eager = base(x)
            gm = make_fx(lambda t: base(t), tracing_mode="real")(x)
            reason = _value_dependent(gm)
            if reason is None:
                y_graph = gm(x)
                if not _identical(y_graph, y_eager):
                    reason = "the recorded graph's outputs differ from the eager forward's"
        except Exception as e:  # any failure to record: stay eager
            reason = f"recording failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        runner = _torchscript_runner(gm, x, y_eager) if reason is None else None
        # (building the GraphModule registered its constants, and the TorchScript wrapper gm:
        # not edits of the model)
        state.epoch = _epoch[0]
        if reason is not None:
            state.graphs[key] = False
            state.refused[key] = reason
            warnings.warn(
                f"dsconv_ext: {type(self).__name__} input {tuple(x.shape)} runs the eager forward: "
                f"{reason}",
                RuntimeWarning,
                stacklevel=4,
            )
            return y_eager if y_eager is not None else base(x)
        state.graphs[key] = runner if runner is not None else gm
        state.engines[key] = "TorchScript" if runner is not None else "fx"
        return y_graph

    def _apply(self, *args, **kwargs):
        self.__dict__.pop("_dsconv_captures", None)
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_dsconv_captures", None)
        return state


def _captured_class(base: type) -> type:
    return type(
        f"Captured{base.__name__}",
        (CapturedForward, base),
        {"__module__": __name__, "__doc__": f"{base.__name__} with a recorded-graph forward."},
    )


# One subclass per ultralytics model class whose forward is BaseModel._predict_once, under a
# fixed module-level name so that pickles of a converted model find it.
_BASES = ("DetectionModel", "SegmentationModel", "PoseModel", "OBBModel", "ClassificationModel")
_CLASSES: Dict[type, type] = {}
for _name in _BASES:
    _base = getattr(tasks, _name, None)
    if _base is not None:
        _cls = _captured_class(_base)
        globals()[_cls.__name__] = _cls
        _CLASSES[_base] = _cls
del _name, _base, _cls


def use_graph_capture(model: nn.Module) -> Optional[str]:
    """Give an ultralytics model (one of its plain detection, segmentation, pose, OBB or
    classification classes, whose forward is ``BaseModel._predict_once``) the recorded-graph
    forward, in place; returns its new class name, or None where the model is not one of those."""
    if isinstance(model, CapturedForward):
        return type(model).__name__
    cls = _CLASSES.get(type(model))
    if cls is None or type(model)._predict_once is not tasks.BaseModel._predict_once:
        return None
    model.__class__ = cls
    return cls.__name__


def clear_captures(model: nn.Module) -> int:
    """Drop the graphs recorded for ``model`` (after editing its modules' attributes); returns
    how many there were."""
    state = model.__dict__.pop("_dsconv_captures", None)
    return sum(1 for g in state.graphs.values() if g) if state is not None else 0


def capture_report(model: nn.Module) -> Dict[str, List[str]]:
    """The input signatures ``model`` replays as recorded graphs, and those refused with why."""
    state = model.__dict__.get("_dsconv_captures")
    if state is None or state.epoch != _epoch[0]:
        return {"recorded": [], "refused": []}

    def show(key):
        shape, _, dtype, device = key
        return f"{list(shape)} {str(dtype).replace('torch.', '')} {device}"

    return {
        "recorded": [f"{show(k)}: {state.engines[k]}" for k, g in state.graphs.items() if g],
        "refused": [f"{show(k)}: {state.refused[k]}" for k, g in state.graphs.items() if not g],
    }
