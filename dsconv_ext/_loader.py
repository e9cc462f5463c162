"""Loading of the compiled kernels (``dsconv_ext._C``), with compilation on first use.

Order: the extension built at install time; else, unless ``DSCONV_EXT_JIT=0``, compile the C++
sources shipped in the package (or the checkout's ``csrc/``) with torch's JIT builder, saying so
in one line; else run on the PyTorch fallback and say why (``python -m dsconv_ext info``).
"""

from __future__ import annotations

import glob
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class LibraryStatus:
    loaded: bool
    how: str  # "installed", "jit", or "" when not loaded
    reason: str  # why it is not loaded (or empty)
    path: Optional[str] = None


_status: Optional[LibraryStatus] = None
_lock = threading.Lock()


def _source_dir() -> Optional[str]:
    for cand in (os.path.join(_PKG_DIR, "_csrc"), os.path.join(os.path.dirname(_PKG_DIR), "csrc")):
        if os.path.isfile(os.path.join(cand, "dsconv2d.cpp")):
            return cand
    return None


def _jit_build() -> str:
    import logging

    # Importing cpp_extension warns about guessing CUDA_HOME on machines without a GPU; this
    # build is CPU-only, so that line would only mislead.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load

    src = _source_dir()
    if src is None:
        raise RuntimeError("the C++ sources are not in the package (reinstall dsconv_ext)")
    sources = [os.path.join(src, "dsconv2d.cpp")]
    sources += sorted(glob.glob(os.path.join(src, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(src, "cpu", "*.cpp")))
    sources = sorted(set(sources))
    print(
        "dsconv_ext: compiling the C++ CPU kernels on first use (about a minute, cached "
        "afterwards; install with `pip install --no-build-isolation .` to do it at install)",
        file=sys.stderr,
        flush=True,
    )
    load(
        name="dsconv_ext_C",
        sources=sources,
        extra_cflags=["-O3"],
        extra_include_paths=[src],
        is_python_module=False,
        verbose=False,
    )
    return src


def cpu_op_available(name: str, fake: Callable) -> bool:
    """Whether the compiled op ``dsconv_ext::name`` has a CPU kernel (loads the library first),
    registering ``fake`` as its fake kernel (for torch.compile and opcheck) when it exists. Call
    once per op (memoise the answer)."""
    import torch

    if not load_library().loaded or not hasattr(torch.ops.dsconv_ext, name):
        return False
    torch.library.register_fake(f"dsconv_ext::{name}")(fake)
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dsconv_ext::{name}", "CPU")


def load_library() -> LibraryStatus:
    """Load the compiled kernels once; never raises."""
    global _status
    if _status is not None:
        return _status
    with _lock:
        if _status is not None:
            return _status
        try:
            from . import _C  # noqa: F401

            _status = LibraryStatus(True, "installed", "", getattr(_C, "__file__", None))
            return _status
        except ImportError as e:
            installed_error = str(e)
            if glob.glob(os.path.join(_PKG_DIR, "_C*.so")) + glob.glob(
                os.path.join(_PKG_DIR, "_C*.pyd")
            ):
                # The library exists but failed to import: it may already have registered its
                # ops, and compiling a second copy would register them twice (a hard abort).
                _status = LibraryStatus(
                    False, "", f"the installed dsconv_ext._C failed to import: {installed_error}"
                )
                return _status
        if os.environ.get("DSCONV_EXT_JIT", "1") == "0":
            _status = LibraryStatus(
                False,
                "",
                f"not installed ({installed_error}) and "
                "DSCONV_EXT_JIT=0 disables compiling on first use",
            )
            return _status
        try:
            path = _jit_build()
            _status = LibraryStatus(True, "jit", "", path)
        except Exception as e:  # no compiler, no headers, ...: keep working on the fallback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _status = LibraryStatus(False, "", f"not installed and compiling it failed: {first}")
        return _status
