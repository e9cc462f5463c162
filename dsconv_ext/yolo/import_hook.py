"""Run a callback when a module has been imported: the mechanism behind automatic registration.

Standard library only, with no imports of this package, so that the start-up hook can load it by
path without importing torch or dsconv_ext (see ``_autoload``). One module instance serves the
whole process: it is loaded under its package name whichever way it is reached.
"""

import sys

__all__ = ["initializing", "module_finished", "pending", "uninstall", "when_imported"]

MARK = "_dsconv_ext_yolo_hook"  # identifies our finder on sys.meta_path

# Callbacks for modules that were being executed when asked for: each such module calls
# module_finished(__name__) as its last statement.
_after_init = {}
_finished = set()  # modules whose last statement ran (they are still "initializing" until then)


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
    """Meta-path finder that only acts on the modules it has callbacks for."""

    _dsconv_ext_yolo_hook = True

    def __init__(self):
        self.callbacks = {}  # module name -> [fn(module)]

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if getattr(finder, MARK, False) or not hasattr(finder, "find_spec"):
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
        if getattr(f, MARK, False):
            return f
    f = _Finder()
    sys.meta_path.insert(0, f)
    return f


def initializing(name: str) -> bool:
    """Whether module ``name`` is being executed and has not reached :func:`module_finished`."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False)) and name not in _finished


def when_imported(name: str, fn) -> None:
    """Call ``fn(module)`` once module ``name`` has been imported: now if it is, at its end if it
    is being executed (it must then call :func:`module_finished`), else when it is imported."""
    module = sys.modules.get(name)
    if module is None:
        _finder().callbacks.setdefault(name, []).append(fn)
    elif initializing(name):
        _after_init.setdefault(name, []).append(fn)
    else:
        fn(module)


def module_finished(name: str) -> None:
    """Called by a module's last statement: run what :func:`when_imported` deferred for it."""
    module = sys.modules[name]
    _finished.add(name)
    for fn in _after_init.pop(name, ()):
        fn(module)


def pending():
    """Names of the modules with callbacks still waiting for their import."""
    names = {n for f in sys.meta_path if getattr(f, MARK, False) for n in f.callbacks}
    return sorted(names | set(_after_init))


def uninstall() -> None:
    """Drop every waiting callback."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, MARK, False)]
    _after_init.clear()
