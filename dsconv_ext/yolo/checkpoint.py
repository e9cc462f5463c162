"""Loading checkpoints safely, and load errors that name the layer.

:func:`restricted_load` unpickles a checkpoint with ``torch.load(weights_only=True)`` and an
allow-list of exactly the classes it needs among torch's, ultralytics' and dsconv_ext's
``nn.Module`` classes (registered around that one load, not for the process). A checkpoint that
needs anything else is refused with the names it asked for; loading it anyway
(:func:`trusted_load`) is an explicit choice for files the user trusts.

A frozen DSConv2d refuses, while being unpickled, a storage format version other than its own;
at that point it does not know where in the model it sits. When a load fails that way,
:func:`format_mismatches` unpickles the checkpoint once more (restricted, and with DSConv2d told
to accept any version for that thread) and reports every layer by its path, so the message says
which layers (``model.2.m.0.cv1.conv``, ...) need converting again.
"""

from __future__ import annotations

import functools
import importlib
import os
import pathlib
import pickle
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

__all__ = [
    "UnsafeCheckpointError",
    "format_mismatches",
    "restricted_load",
    "trusted_load",
    "wrap_torch_safe_load",
]

# Modules whose nn.Module classes a restricted load may rebuild (legacy dsconv_ext paths resolve
# through dsconv_ext._compat).
_MODULE_PREFIXES = ("torch.nn.modules.", "ultralytics.nn.", "dsconv_ext.")
# Plain objects that ultralytics checkpoints hold besides modules and tensors.
_PLAIN_GLOBALS = (
    "ultralytics.utils.IterableSimpleNamespace",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint needs globals that a restricted load does not rebuild."""


def _module_getattr(obj, name: str):
    """``getattr`` as a restricted load allows it: fused models pickle ``forward`` as the bound
    ``forward_fuse`` of their layer (ultralytics' fuse() and quantize() both set it)."""
    if isinstance(obj, nn.Module) and name in ("forward", "forward_fuse"):
        return getattr(type(obj), name).__get__(obj)
    raise pickle.UnpicklingError(
        f"getattr({type(obj).__name__}, {name!r}) is not allowed in a restricted load"
    )


def _special_global(name: str):
    if name == "builtins.getattr":
        return _module_getattr
    if name in ("pathlib.PosixPath", "pathlib.WindowsPath", "pathlib._local.PosixPath",
                "pathlib._local.WindowsPath"):  # fmt: skip
        return type(pathlib.Path())  # a path saved on either OS, as this OS's path
    return None


def _allowed(name: str):
    """The object a restricted load may rebuild for global ``name``, or None."""
    special = _special_global(name)
    if special is not None:
        return special
    module, _, attr = name.rpartition(".")
    if not module.startswith(_MODULE_PREFIXES) and name not in _PLAIN_GLOBALS:
        if not (module.startswith("numpy.dtypes") and attr.endswith("DType")):
            return None
    try:
        owner = importlib.import_module(module)
        obj = getattr(owner, attr)
    except (ImportError, AttributeError):
        return None
    if name in _PLAIN_GLOBALS or module.startswith("numpy.dtypes"):
        return obj
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return obj
    # dsconv_ext's own plain objects that its modules hold (listed by their module)
    return obj if obj in getattr(owner, "SAFE_GLOBALS", ()) else None


def _check_file(path) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")


def restricted_load(path) -> object:
    """``torch.load(path, weights_only=True)`` allowing only the module classes it needs.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a PyTorch checkpoint (a zip archive written by ``torch.save``).
        UnsafeCheckpointError: it needs globals outside the allow-list (named in the message).
    """
    _check_file(path)
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # not a zip archive, a truncated one, ...
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    entries: List[Tuple[object, str]] = []
    refused: List[str] = []
    for name in needed:
        obj = _allowed(name)
        if obj is None:
            refused.append(name)
        else:
            entries.append((obj, name))
    if refused:
        shown = ", ".join(refused[:6]) + (
            f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        )
        raise UnsafeCheckpointError(
            f"{path} needs {shown}, which a restricted load does not rebuild; load it without "
            "restriction only if you trust the file (convert: --trust-pickle)"
        )
    with torch.serialization.safe_globals(entries):
        return torch.load(path, map_location="cpu", weights_only=True)


def trusted_load(path) -> object:
    """Unrestricted unpickling (arbitrary code can run): only for files the user trusts."""
    _check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _models(ckpt) -> List[nn.Module]:
    if isinstance(ckpt, nn.Module):
        return [ckpt]
    if isinstance(ckpt, dict):
        return [m for k in ("ema", "model") if isinstance(m := ckpt.get(k), nn.Module)][:1]
    return []


def format_mismatches(path) -> List[Tuple[str, object]]:
    """(layer path, saved format version) of every DSConv2d in checkpoint ``path`` whose format
    version differs from this dsconv_ext's (restricted load; raises like :func:`restricted_load`).
    """
    from ..dsconv.module import DSConv2d, format_diagnosis

    with format_diagnosis():
        ckpt = restricted_load(path)
    out = []
    for model in _models(ckpt):
        for layer, m in model.named_modules():
            if isinstance(m, DSConv2d) and "_saved_format_version" in m.__dict__:
                out.append((m.__dict__.get("layer_name") or layer, m._saved_format_version))
    return out


def wrap_torch_safe_load(original):
    """Wrap ultralytics' ``torch_safe_load`` so that a format-version error names the layers."""

    @functools.wraps(original)
    def torch_safe_load(weight, *args, **kwargs):
        from ..dsconv.module import FORMAT_VERSION, DSConvFormatError

        try:
            return original(weight, *args, **kwargs)
        except DSConvFormatError as e:
            try:
                bad = format_mismatches(weight)
            except Exception:  # diagnosis is best effort: the original error stands
                raise e from None
            if not bad:
                raise
            layers = ", ".join(f"'{n}' (version {v})" for n, v in bad[:8])
            more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
            raise DSConvFormatError(
                f"{weight}: DSConv layer(s) {layers}{more} were saved with another dsconv_ext "
                f"format version; this dsconv_ext reads version {FORMAT_VERSION}. Convert the "
                "float model again (python -m dsconv_ext convert ...)."
            ) from e

    torch_safe_load.__dsconv_ext_original__ = original
    return torch_safe_load


def checkpoint_model(ckpt, path) -> Tuple[nn.Module, Dict]:
    """The model of an ultralytics checkpoint dict (its EMA when saved) and the dict itself."""
    if not isinstance(ckpt, dict):
        raise ValueError(
            f"{path} holds a {type(ckpt).__name__}, not an ultralytics checkpoint (a dict with "
            "'model' or 'ema')"
        )
    models = _models(ckpt)
    if not models:
        raise ValueError(f"{path} holds no model (keys: {sorted(map(str, ckpt))})")
    return models[0], ckpt
