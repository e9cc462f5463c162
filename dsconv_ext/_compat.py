"""Module paths of earlier releases, so that their pickled checkpoints keep loading.

A pickle names each class by ``module.qualname``. Modules that moved keep their old name here:
importing an old path (``dsconv_ext.modules.dsconv``) gives a module holding the public names of
the modules that now define them (the very same classes), and :func:`legacy_safe_globals`
allow-lists the classes under their old names too for ``torch.load(weights_only=True)``.
Nothing is imported until an old path is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import List, Tuple

__all__ = ["LEGACY_MODULES", "install", "legacy_safe_globals"]

# old module path -> the modules its contents live in now
LEGACY_MODULES = {
    "dsconv_ext.modules": ("dsconv_ext.dsconv.module", "dsconv_ext.yolo.pooling"),
    "dsconv_ext.modules.dsconv": ("dsconv_ext.dsconv.module",),
    "dsconv_ext.modules.pooling": ("dsconv_ext.yolo.pooling",),
    "dsconv_ext.ops": ("dsconv_ext.dsconv.ops",),
    "dsconv_ext.quant_primitives": ("dsconv_ext.dsconv.quant_primitives",),
    "dsconv_ext.convert": ("dsconv_ext.yolo.convert",),
}

# The old modules that defined classes (the names pickles of earlier checkpoints hold).
_DEFINING_MODULES = ("dsconv_ext.modules.dsconv", "dsconv_ext.modules.pooling")


class _AliasLoader(importlib.abc.Loader):
    """Fills a fresh module with the public names of the current modules (not the modules
    themselves under a second name: the import system would overwrite their ``__spec__``)."""

    def __init__(self, targets):
        self.targets = targets

    def exec_module(self, module):
        for target in self.targets:
            real = importlib.import_module(target)
            names = getattr(real, "__all__", None) or [n for n in vars(real) if n[:1] != "_"]
            module.__dict__.update({n: getattr(real, n) for n in names})


class _LegacyFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = LEGACY_MODULES.get(fullname)
        if new is None:
            return None
        # is_package: pickles of dsconv_ext.modules.dsconv first import dsconv_ext.modules
        is_pkg = any(k.startswith(fullname + ".") for k in LEGACY_MODULES)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new), is_package=is_pkg)


def install() -> None:
    """Put the legacy-path finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _LegacyFinder) for f in sys.meta_path):
        sys.meta_path.append(_LegacyFinder())


def legacy_safe_globals(classes) -> List[Tuple[type, str]]:
    """``(class, old path)`` for each of ``classes`` that an earlier release defined elsewhere."""
    return [
        (cls, f"{old}.{cls.__qualname__}")
        for cls in classes
        for old in _DEFINING_MODULES
        if cls.__module__ in LEGACY_MODULES[old]
    ]
