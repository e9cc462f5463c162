"""Register dsconv_ext's YOLO modules the moment ``ultralytics.nn.tasks`` is imported.

Standard library only, and importable on its own: the ``dsconv_ext_yolo.pth`` file that the
install drops into site-packages loads this file by path at interpreter start-up, so that the
``yolo`` command line, a fresh process unpickling a ``best.pt`` and DDP worker processes know the
modules without user code importing ``dsconv_ext``. Importing torch or ultralytics here would
slow down every Python process on the machine, so nothing heavy happens until ultralytics itself
is imported.

Opt out with the environment variable ``DSCONV_EXT_YOLO=0``.
"""

import os
import sys
import warnings

ENV_VAR = "DSCONV_EXT_YOLO"
TARGET = "ultralytics.nn.tasks"
_MARK = "_dsconv_ext_yolo_hook"  # attribute that identifies our finder, whichever copy loaded it


def enabled() -> bool:
    """False when the user opted out with ``DSCONV_EXT_YOLO=0`` (or false/no/off)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _register(tasks_module) -> None:
    # A failure here must not break `import ultralytics` for models that never use dsconv_ext:
    # register(strict=False) warns and makes our YAML names raise the reason when used.
    try:
        from dsconv_ext.yolo.registry import register

        register(strict=False)
    except Exception as e:  # pragma: no cover - depends on the installed ultralytics
        warnings.warn(
            f"dsconv_ext: YOLO module registration failed: {type(e).__name__}: {e}",
            RuntimeWarning,
            stacklevel=2,
        )


class _Loader:
    """Wraps a module's real loader; runs the callbacks once the module has executed."""

    def __init__(self, inner, callbacks):
        self.inner = inner
        self.callbacks = callbacks

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        for fn in self.callbacks:
            fn(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for inspect and linecache
        return getattr(self.inner, name)


class _Finder:
    """Meta-path finder that only acts on the modules it has callbacks for.

    One instance serves every copy of this file (the .pth loads it under another name than
    ``dsconv_ext.yolo._autoload``): they find it in ``sys.meta_path`` by its marker attribute.
    """

    _dsconv_ext_yolo_hook = True

    def __init__(self):
        self.callbacks = {}  # module name -> [fn(module)]

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if getattr(finder, _MARK, False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, self.callbacks.pop(fullname))
        return spec


def _finder():
    for f in sys.meta_path:
        if getattr(f, _MARK, False):
            return f
    f = _Finder()
    sys.meta_path.insert(0, f)
    return f


def when_imported(name: str, fn) -> None:
    """Call ``fn(module)`` once module ``name`` has been imported (now, if it already is)."""
    module = sys.modules.get(name)
    if module is not None:
        fn(module)
    else:
        _finder().callbacks.setdefault(name, []).append(fn)


def install() -> bool:
    """Arrange registration for when ultralytics is imported (now, if it already is).

    Returns False when the user opted out.
    """
    if not enabled():
        return False
    when_imported(TARGET, _register)
    return True


def uninstall() -> None:
    """Drop pending hooks (registration already done stays; see ``registry.unregister``)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, _MARK, False)]
