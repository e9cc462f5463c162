"""Checkpoint loading errors that name the layer.

A frozen DSConv2d refuses, while being unpickled, a storage format version other than its own;
at that point it does not know where in the model it sits. When a load fails that way,
:func:`format_mismatches` unpickles the checkpoint once more with a stand-in class that accepts
any version, walks the model, and reports every layer by its path, so the message says which
layers (``model.2.m.0.cv1.conv``, ...) need converting again.
"""

from __future__ import annotations

import functools
import pickle
from typing import List, Tuple

import torch
import torch.nn as nn

__all__ = ["format_mismatches", "wrap_torch_safe_load"]


def _probe_class():
    from ..modules.dsconv import DSConv2d

    class DSConv2dProbe(nn.Module):
        """Records a saved DSConv2d's state without checking or unpacking it."""

        def __setstate__(self, state):
            nn.Module.__setstate__(self, state)

    return DSConv2d, DSConv2dProbe


def format_mismatches(path, safe_loader=None) -> List[Tuple[str, object]]:
    """(layer path, saved format version) of every DSConv2d in checkpoint ``path`` whose format
    version differs from this dsconv_ext's.

    Args:
        path: a ``torch.save``d checkpoint (ultralytics dict or a bare module).
        safe_loader: for a restricted (``weights_only``) load, the function that does it
            (``path -> checkpoint``); the stand-in class is allow-listed under DSConv2d's name.
    """
    from ..modules.dsconv import FORMAT_VERSION

    real, probe = _probe_class()
    name = f"{real.__module__}.{real.__qualname__}"
    if safe_loader is not None:
        # torch keeps its allow-list in a set: with both DSConv2d and the stand-in registered
        # under one name, which one wins would be arbitrary. Swap them for this load.
        saved = torch.serialization.get_safe_globals()
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(
            [g for g in saved if g is not real and not (isinstance(g, tuple) and g[0] is real)]
            + [(probe, name)]
        )
        try:
            ckpt = safe_loader(path)
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(saved)
    else:

        class ProbeUnpickler(pickle.Unpickler):
            def find_class(self, module, qualname):
                if f"{module}.{qualname}" == name:
                    return probe
                return super().find_class(module, qualname)

        class PickleModule:
            __name__ = "pickle"
            Unpickler = ProbeUnpickler
            load = staticmethod(pickle.load)

        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=PickleModule)
    models = [ckpt] if isinstance(ckpt, nn.Module) else []
    if isinstance(ckpt, dict):
        models = [m for k in ("ema", "model") if isinstance(m := ckpt.get(k), nn.Module)][:1]
    out = []
    for model in models:
        for layer, m in model.named_modules():
            if isinstance(m, probe):
                version = m.__dict__.get("format_version")
                if version != FORMAT_VERSION:
                    out.append((m.__dict__.get("layer_name") or layer, version))
    return out


def wrap_torch_safe_load(original):
    """Wrap ultralytics' ``torch_safe_load`` so that a format-version error names the layers."""

    @functools.wraps(original)
    def torch_safe_load(weight, *args, **kwargs):
        from ..modules.dsconv import FORMAT_VERSION, DSConvFormatError

        try:
            return original(weight, *args, **kwargs)
        except DSConvFormatError as e:
            import ultralytics.utils

            safe = kwargs.get("safe_only", args[0] if args else None)
            if safe is None:
                safe = getattr(ultralytics.utils, "SAFE_LOAD", False)  # 8.4: ULTRALYTICS_SAFE_LOAD
            loader = (lambda p: original(p, safe_only=True)[0]) if safe else None
            try:
                bad = format_mismatches(weight, loader)
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
