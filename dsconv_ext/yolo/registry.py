"""Registration of dsconv_ext's modules with ultralytics, in memory, with loud version checks.

What :func:`register` changes (all undone by :func:`unregister`; nothing on disk):

- ``ultralytics.nn.tasks`` globals gain our YAML names (``DSConv``, ``C3k2_DSConv``, ...), which
  ``parse_model`` resolves with ``globals()[name]``.
- ``parse_model`` is recompiled with our modules added to its scaling rules
  (:mod:`dsconv_ext.yolo.parse_patch`) and wrapped so errors in our rows name the layer.
- ``BaseModel.fuse`` also folds the BatchNorm of each ``DSConv`` into its channel shift.
- ``get_flops`` counts DSConv layers (``model.info()``; thop has no rule for them).
- ``generate_ddp_file`` makes DDP workers register too, even without the ``.pth`` hook.
- ``torch_safe_load`` names the layers when a checkpoint has another DSConv format version.
- ``Exporter.export_onnx`` and ``Exporter.export_openvino`` (once the exporter is imported) export
  DSConv as standard operators (:mod:`dsconv_ext.yolo.export`).
- our classes join torch's safe globals, so ``ULTRALYTICS_SAFE_LOAD=1`` loads our checkpoints.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import warnings
from typing import Dict, List, Optional

from . import rows
from .errors import RegistrationError
from .import_hook import initializing, when_imported
from .parse_patch import (
    HOOK_NAME,
    OURS_ATTR,
    ParseModelShapeError,
    check_alias_treatment,
    patch_parse_model,
)

__all__ = [
    "ALIASES",
    "MIN_ULTRALYTICS",
    "RegistrationError",
    "TESTED_ULTRALYTICS",
    "fuse_dsconv",
    "is_registered",
    "register",
    "safe_globals",
    "unregister",
    "yaml_classes",
]

MIN_ULTRALYTICS = "8.3.0"
TESTED_ULTRALYTICS = ("8.3.0", "8.4.190")

# Ultralytics name -> our YAML names that parse_model treats exactly like it.
ALIASES = {
    "Conv": ("DSConv",),
    "Bottleneck": ("Bottleneck_DSConv",),
    "C3": ("C3k_DSConv",),
    "C3k2": ("C3k2_DSConv",),
}


_lock = threading.RLock()
_state: Dict[str, object] = {}  # what we replaced, to restore on unregister
_busy = False


def _version_tuple(v: str):
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def yaml_classes() -> Dict[str, type]:
    """Our YAML-visible classes by name (imports them; BRA is optional while it is absent)."""
    from ..dsconv.module import DSConv
    from .blocks import Bottleneck_DSConv, C3k2_DSConv, C3k_DSConv

    out = {
        "DSConv": DSConv,
        "Bottleneck_DSConv": Bottleneck_DSConv,
        "C3k_DSConv": C3k_DSConv,
        "C3k2_DSConv": C3k2_DSConv,
    }
    try:
        from ..bra import BiLevelRoutingAttention, KVGather, QKVLinear, TopkRouting
    except ImportError:  # pragma: no cover - only while the BRA package is missing
        pass
    else:
        out.update(
            BiLevelRoutingAttention=BiLevelRoutingAttention,
            TopkRouting=TopkRouting,
            KVGather=KVGather,
            QKVLinear=QKVLinear,
        )
    return out


def safe_globals() -> List[object]:
    """Everything our pickled modules reference: every nn.Module class defined in dsconv_ext
    (plus anything a module lists in ``SAFE_GLOBALS``)."""
    import importlib

    import torch.nn as nn

    from .._compat import legacy_safe_globals

    found: Dict[str, object] = {}
    for mod_name in (
        "dsconv_ext.dsconv.module",
        "dsconv_ext.yolo.pooling",
        "dsconv_ext.bra.module",
        "dsconv_ext.yolo.blocks",
        "dsconv_ext.yolo.inplace_concat",
        "dsconv_ext.yolo.fast_dfl",
        "dsconv_ext.yolo.fast_stem",
        "dsconv_ext.yolo.graph_capture",
    ):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for obj in list(vars(mod).values()) + list(getattr(mod, "SAFE_GLOBALS", ())):
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                if obj.__module__.startswith("dsconv_ext."):
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
            elif obj in getattr(mod, "SAFE_GLOBALS", ()):
                found[f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)}"] = obj
    classes = list(found.values())
    return classes + legacy_safe_globals(c for c in classes if isinstance(c, type))


def fuse_dsconv(model) -> int:
    """Fold the BatchNorm of every un-fused DSConv in ``model`` into its channel shift.

    Returns:
        How many layers were fused.
    """
    count = 0
    for m in model.modules():
        if callable(getattr(m, "fuse_bn", None)) and getattr(m, "bn", None) is not None:
            m.fuse_bn()
            count += 1
    return count


class _Unavailable:
    """Stands in for our YAML names when registration failed: using one says why."""

    reason = ""

    def __init__(self, *args, **kwargs):
        raise RegistrationError(self.reason)


def _name_layers(layers) -> None:
    """Give each DSConv2d its path in the model (``model.2.m.0.cv1.conv``), so that errors about
    a saved layer (format version) can name it."""
    from ..dsconv.module import DSConv2d

    for name, m in layers.named_modules():
        if isinstance(m, DSConv2d):
            m.layer_name = f"model.{name}"


def _wrap_parse_model(patched, original):
    @functools.wraps(original)
    def parse_model(*args, **kwargs):
        try:
            model, save = patched(*args, **kwargs)
            _name_layers(model)
            return model, save
        except rows.YamlRowError:
            raise
        except Exception as e:
            row = rows.current_row()
            if row is None:
                raise
            src, i, name, yaml_args = row
            msg = (
                f"{src + ': ' if src else ''}layer {i} ({name}, YAML args {yaml_args}): "
                f"{type(e).__name__}: {e}"
            )
            try:
                err = type(e)(msg)
            except Exception:
                err = RuntimeError(msg)
            raise err from e
        finally:
            rows.clear_row()

    parse_model.__dsconv_ext_original__ = original
    setattr(parse_model, OURS_ATTR, parse_model)  # see parse_patch.OURS_ATTR
    return parse_model


def _wrap_fuse(original):
    sig = inspect.signature(original)

    @functools.wraps(original)
    def fuse(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        verbose = bound.arguments.get("verbose", False)
        if "verbose" in bound.arguments:
            bound.arguments["verbose"] = False  # print once, after our layers are fused too
        out = original(*bound.args, **bound.kwargs)
        fuse_dsconv(self)
        if verbose:
            extra = {"imgsz": bound.arguments["imgsz"]} if "imgsz" in bound.arguments else {}
            self.info(verbose=True, **extra)
        return out

    fuse.__dsconv_ext_original__ = original
    return fuse


def _wrap_get_flops(original):
    from .flops import counting_rules

    @functools.wraps(original)
    def get_flops(*args, **kwargs):
        with counting_rules():
            return original(*args, **kwargs)

    get_flops.__dsconv_ext_original__ = original
    return get_flops


def _ddp_header() -> str:
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return (
        "# dsconv_ext: register its YOLO modules in this DDP worker before ultralytics builds or\n"
        "# loads a model that uses them (added by dsconv_ext.yolo.registry).\n"
        "import sys as _dsconv_ext_sys\n"
        f"if {pkg_parent!r} not in _dsconv_ext_sys.path:\n"
        f"    _dsconv_ext_sys.path.append({pkg_parent!r})\n"
        "import dsconv_ext.yolo as _dsconv_ext_yolo\n"
        "_dsconv_ext_yolo.register()\n"
    )


def _wrap_generate_ddp_file(original):
    @functools.wraps(original)
    def generate_ddp_file(*args, **kwargs):
        path = original(*args, **kwargs)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "_dsconv_ext_yolo.register()" not in text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(_ddp_header() + text)
        return path

    generate_ddp_file.__dsconv_ext_original__ = original
    return generate_ddp_file


def _targets():
    """(owner, attribute, wrapper factory) of every function we wrap, checked before patching."""
    from ultralytics.nn import tasks
    from ultralytics.utils import dist, torch_utils

    from .checkpoint import wrap_torch_safe_load

    out = [
        (tasks, "torch_safe_load", wrap_torch_safe_load),
        (tasks.BaseModel, "fuse", _wrap_fuse),
        (torch_utils, "get_flops", _wrap_get_flops),
        (dist, "generate_ddp_file", _wrap_generate_ddp_file),
    ]
    for owner, attr, _ in out:
        fn = inspect.getattr_static(owner, attr, None)
        if not inspect.isfunction(fn):
            raise _shape_error(
                f"{getattr(owner, '__name__', owner)}.{attr} is missing or not a function"
            )
    params = list(inspect.signature(tasks.BaseModel.fuse).parameters)
    if params[:2] != ["self", "verbose"]:
        raise _shape_error(f"BaseModel.fuse takes {params}, expected (self, verbose, ...)")
    return out


def _shape_error(msg: str) -> RegistrationError:
    import ultralytics

    return RegistrationError(
        f"dsconv_ext cannot extend ultralytics {ultralytics.__version__}: {msg}. Tested with "
        f"{', '.join(TESTED_ULTRALYTICS)}; set DSCONV_EXT_YOLO=0 to run without dsconv_ext's "
        "YOLO modules."
    )


def is_registered() -> bool:
    """True when our modules are registered with the imported ultralytics."""
    return bool(_state)


def register(strict: bool = True) -> bool:
    """Register dsconv_ext's modules with ultralytics (idempotent, thread-safe).

    Args:
        strict: raise :class:`RegistrationError` when ultralytics cannot be extended. With
            ``strict=False`` (the automatic import hook) warn instead, and make our YAML names
            raise that reason when a model uses them, so other models keep working.

    Returns:
        True when registered.
    """
    global _busy
    with _lock:
        if _state or _busy:  # _busy: re-entered from `import dsconv_ext` inside our own import
            return bool(_state) or _busy
        if initializing(_BLOCKS):
            # ultralytics is being imported for the first time by blocks.py's own imports (user
            # code imported our blocks, or safe_globals() did, before ultralytics): the classes
            # to register do not exist yet. Register when blocks.py has run to its end.
            when_imported(_BLOCKS, lambda module: register(strict=False))
            return False
        _busy = True
        try:
            _register()
            return True
        except (RegistrationError, ParseModelShapeError, ImportError) as e:
            if strict:
                raise
            warnings.warn(
                f"dsconv_ext: YOLO modules not registered: {e}", RuntimeWarning, stacklevel=2
            )
            _install_unavailable(str(e))
            return False
        finally:
            _busy = False


_BLOCKS = "dsconv_ext.yolo.blocks"


def _install_unavailable(reason: str) -> None:
    try:
        from ultralytics.nn import tasks
    except ImportError:  # pragma: no cover
        return
    stub = type("DSConvExtUnavailable", (_Unavailable,), {"reason": reason})
    for name in [*(a for v in ALIASES.values() for a in v), "BiLevelRoutingAttention"]:
        tasks.__dict__.setdefault(name, stub)


def _is_ours(obj) -> bool:
    """Defined by dsconv_ext: our classes, the row hook, the stand-ins of a failed registration
    (also those of an earlier import of dsconv_ext, whose class objects differ from ours)."""
    return str(getattr(obj, "__module__", "")).startswith("dsconv_ext.")


def _check_names_free(tasks, names) -> None:
    """Refuse to shadow a name that ultralytics itself defines (a future ``DSConv``, say):
    overwriting it would silently change what ultralytics' own YAMLs and code build."""
    taken = {
        name: tasks.__dict__[name]
        for name in names
        if name in tasks.__dict__ and not _is_ours(tasks.__dict__[name])
    }
    if taken:
        what = ", ".join(
            f"{name} ({getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)})"
            for name, obj in taken.items()
        )
        raise _shape_error(
            f"ultralytics.nn.tasks already defines {what}, which dsconv_ext would replace with "
            "its own module of that name"
        )


def _register() -> None:
    import torch
    import ultralytics

    if _version_tuple(ultralytics.__version__) < _version_tuple(MIN_ULTRALYTICS):
        raise RegistrationError(
            f"dsconv_ext needs ultralytics>={MIN_ULTRALYTICS}, found {ultralytics.__version__}"
        )
    from ultralytics.nn import tasks

    classes = yaml_classes()
    _check_names_free(tasks, [*classes, HOOK_NAME])
    # Everything below up to the first assignment raises before ultralytics is changed.
    patched = patch_parse_model(tasks, ALIASES)
    ours = {cls: name for name, cls in classes.items()}
    hook = rows.row_hook(ours)
    check_alias_treatment(patched, tasks, ALIASES, classes, hook)
    targets = _targets()

    saved: Dict[str, object] = {
        "names": {k: tasks.__dict__.get(k, _MISSING) for k in [*classes, HOOK_NAME]}
    }
    tasks.__dict__.update(classes)
    tasks.__dict__[HOOK_NAME] = hook

    original = tasks.parse_model
    wrapper = _wrap_parse_model(patched, original)
    saved["parse_model"] = original
    tasks.parse_model = wrapper
    nn_pkg = sys.modules.get("ultralytics.nn")
    # The package re-export is the original, or (when registration ran while ultralytics.nn was
    # still importing, which then re-exported our wrapper) a wrapper of an earlier registration.
    reexport = getattr(nn_pkg, "parse_model", None)
    if nn_pkg is not None and (
        reexport is original or getattr(reexport, "__dsconv_ext_original__", None) is original
    ):
        nn_pkg.parse_model = wrapper
        saved["nn.parse_model"] = original

    saved["wrapped"] = []
    for owner, attr, factory in targets:
        fn = inspect.getattr_static(owner, attr)
        new = factory(fn)
        setattr(owner, attr, new)
        saved["wrapped"].append((owner, attr, fn))
        if owner is tasks and nn_pkg is not None and getattr(nn_pkg, attr, None) is fn:
            setattr(nn_pkg, attr, new)  # 8.3 re-exports tasks' functions from ultralytics.nn
            saved["wrapped"].append((nn_pkg, attr, fn))

    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(safe_globals())
    _state.update(saved)
    # The exporter imports half of ultralytics: patch it when (if) something imports it.
    when_imported("ultralytics.engine.exporter", _patch_exporter)


def _patch_exporter(module) -> None:
    from .export import EXPORT_METHODS, wrap_export

    with _lock:
        if not _state or "exporter" in _state:
            return
        exporter = getattr(module, "Exporter", None)
        wrapped = []
        for attr in EXPORT_METHODS:
            fn = inspect.getattr_static(exporter, attr, None)
            if not inspect.isfunction(fn):
                warnings.warn(
                    f"dsconv_ext: {_shape_error(f'Exporter.{attr} is missing')}; that export of "
                    "DSConv layers will fail",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            setattr(exporter, attr, wrap_export(fn, attr))
            wrapped.append((attr, fn))
        _state["exporter"] = (exporter, wrapped)


_MISSING = object()


def unregister() -> None:
    """Undo :func:`register` (safe globals stay: torch has no way to remove single entries)."""
    with _lock:
        if not _state:
            return
        from ultralytics.nn import tasks

        for name, old in _state["names"].items():
            if old is _MISSING:
                tasks.__dict__.pop(name, None)
            else:
                tasks.__dict__[name] = old
        tasks.parse_model = _state["parse_model"]
        nn_pkg = sys.modules.get("ultralytics.nn")
        if "nn.parse_model" in _state:
            nn_pkg.parse_model = _state["nn.parse_model"]
        elif getattr(getattr(nn_pkg, "parse_model", None), "__dsconv_ext_original__", None):
            nn_pkg.parse_model = nn_pkg.parse_model.__dsconv_ext_original__
        for owner, attr, fn in _state["wrapped"]:
            setattr(owner, attr, fn)
        if "exporter" in _state:
            exporter, wrapped = _state["exporter"]
            for attr, fn in wrapped:
                setattr(exporter, attr, fn)
        _state.clear()


def registered_version() -> Optional[str]:
    """The ultralytics version we registered with, or None."""
    if not _state:
        return None
    import ultralytics

    return ultralytics.__version__
