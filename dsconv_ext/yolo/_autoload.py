"""Register dsconv_ext's YOLO modules the moment ``ultralytics.nn.tasks`` is imported.

Standard library only, and importable on its own: the ``dsconv_ext_yolo.pth`` file that the
install drops into site-packages loads this file by path at interpreter start-up, so that the
``yolo`` command line, a fresh process unpickling a ``best.pt`` and DDP worker processes know the
modules without user code importing ``dsconv_ext``. Importing torch or ultralytics here would
slow down every Python process on the machine, so nothing heavy happens until ultralytics itself
is imported.

Opt out with the environment variable ``DSCONV_EXT_YOLO=0``.
"""

import importlib.util
import os
import sys
import warnings

ENV_VAR = "DSCONV_EXT_YOLO"
TARGET = "ultralytics.nn.tasks"
_HOOK_MODULE = "dsconv_ext.yolo.import_hook"


def enabled() -> bool:
    """False when the user opted out with ``DSCONV_EXT_YOLO=0`` (or false/no/off)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def import_hook():
    """The import_hook module, loaded by path under its package name when the package itself is
    not imported (at start-up, importing ``dsconv_ext`` would import torch)."""
    module = sys.modules.get(_HOOK_MODULE)
    if module is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "import_hook.py")
        spec = importlib.util.spec_from_file_location(_HOOK_MODULE, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_HOOK_MODULE] = module
        spec.loader.exec_module(module)
    return module


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


def install() -> bool:
    """Arrange registration for when ultralytics is imported (now, if it already is).

    Returns False when the user opted out.
    """
    if not enabled():
        return False
    import_hook().when_imported(TARGET, _register)
    return True


def uninstall() -> None:
    """Drop pending hooks (registration already done stays; see ``registry.unregister``)."""
    import_hook().uninstall()
