"""dsconv_ext's YOLO11 integration: YAML-callable modules for ultralytics, registered in memory.

Importing this package is cheap (no torch, no ultralytics); the names below load on first use.

- :func:`register` / :func:`unregister`: extend the imported ultralytics (see
  :mod:`dsconv_ext.yolo.registry`); :func:`autoregister`: register when ultralytics is imported,
  unless ``DSCONV_EXT_YOLO=0``.
- ``Bottleneck_DSConv``, ``C3k_DSConv``, ``C3k2_DSConv``: the DSConv blocks.
"""

from ._autoload import ENV_VAR, enabled
from ._autoload import install as _install_hook

__all__ = [
    "ENV_VAR",
    "Bottleneck_DSConv",
    "C3k2_DSConv",
    "C3k_DSConv",
    "RegistrationError",
    "autoregister",
    "enabled",
    "fuse_dsconv",
    "integration_report",
    "is_registered",
    "register",
    "unregister",
]

_LAZY = {
    "Bottleneck_DSConv": "blocks",
    "C3k_DSConv": "blocks",
    "C3k2_DSConv": "blocks",
    "RegistrationError": "registry",
    "fuse_dsconv": "registry",
    "is_registered": "registry",
    "register": "registry",
    "unregister": "registry",
}


def autoregister() -> bool:
    """Register with ultralytics now if it is imported, else as soon as it is.

    Called by ``import dsconv_ext``. Does nothing (returns False) when ``DSCONV_EXT_YOLO=0``.
    """
    return _install_hook()


def integration_report() -> dict:
    """State of the ultralytics integration, for ``python -m dsconv_ext info``."""
    import sys

    from ._autoload import TARGET
    from .import_hook import pending

    try:
        from .graph_capture import CAPTURE_MODES, capture_mode

        capture_state = CAPTURE_MODES[capture_mode()]
    except ImportError:  # no ultralytics: no model to record
        capture_state = "n/a (ultralytics not installed)"
    except ValueError as e:
        capture_state = f"error: {e}"
    report = {
        "auto_registration": "on" if enabled() else f"off ({ENV_VAR}=0)",
        # converted ultralytics models' recorded-graph forward (dsconv_ext.yolo.graph_capture)
        "graph_capture": capture_state,
        "pth_hook_loaded": "dsconv_ext_yolo_autoload" in sys.modules,
        "import_hooks_waiting": pending(),
    }
    try:
        import ultralytics
    except ImportError:
        report["ultralytics"] = "not installed"
        return report
    from .registry import is_registered

    report["ultralytics"] = ultralytics.__version__
    report["registered"] = is_registered() if TARGET in sys.modules else "ultralytics not imported"
    return report


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
