"""The error dsconv_ext raises when it cannot extend the installed ultralytics.

Its own module so that :mod:`dsconv_ext.yolo.parse_patch` (imported by the registry) can derive
its more specific error from it without an import cycle.
"""

from __future__ import annotations

__all__ = ["RegistrationError"]


class RegistrationError(RuntimeError):
    """The installed ultralytics cannot be extended (too old, changed shape, or already patched
    in a way dsconv_ext must not undo)."""
