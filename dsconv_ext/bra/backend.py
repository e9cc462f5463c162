"""Which attention backend runs where, and the dispatch of the routed-attention core."""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "MIN_VERSIONS",
    "bra_backend_report",
    "resolve_backend",
    "routed_attention",
    "triton_fits",
    "triton_kernels_status",
]

BACKENDS = ("auto", "reference", "torch", "triton")
ENV_VAR = "DSCONV_EXT_BRA_BACKEND"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The oldest versions the Triton backend can work with (for pyproject's extras):
# - torch 2.6: torch.library.triton_op and torch.library.wrap_triton are public from 2.6 on
#   (the tutorial that introduced triton_op was written for 2.6; 2.5 only had a private
#   torch._library.capture_triton).
# - triton 3.2, the version torch 2.6 ships with; the kernels need tl.dot(input_precision=...)
#   (triton >= 3.0). triton.knobs (3.4+) is not used. Only 3.8 was tested here.
MIN_VERSIONS = {"torch": (2, 6), "triton": (3, 2)}


def _version(text: str) -> Tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


_KERNELS_STATUS: Optional[str] = None


def triton_kernels_status() -> str:
    """'ok' when torch and triton are new enough and the kernels module imports, else why not
    (checked once: importing it decorates the kernels)."""
    global _KERNELS_STATUS
    if _KERNELS_STATUS is not None:
        return _KERNELS_STATUS
    want_torch = ".".join(map(str, MIN_VERSIONS["torch"]))
    want_triton = ".".join(map(str, MIN_VERSIONS["triton"]))
    try:
        import triton
    except Exception as e:
        _KERNELS_STATUS = f"triton not importable ({type(e).__name__}: {e})"
        return _KERNELS_STATUS
    if _version(torch.__version__) < MIN_VERSIONS["torch"]:
        why = f"torch {torch.__version__} < {want_torch} (needs torch.library.triton_op)"
    elif _version(triton.__version__) < MIN_VERSIONS["triton"]:
        why = f"triton {triton.__version__} < {want_triton}"
    else:
        try:
            from . import triton_kernels  # noqa: F401

            why = "ok"
        except Exception as e:  # an API the kernels use is missing: say which
            why = f"the Triton kernels do not import ({type(e).__name__}: {e})"
    _KERNELS_STATUS = why
    return why


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_status(device: Optional[torch.device] = None) -> str:
    """'ok' when the Triton kernels can run on ``device`` (CPU: the interpreter), else why not."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type in ("cpu", "cuda"):
        why = triton_kernels_status()
        if why != "ok":
            return why
    if device.type == "cpu":
        if not _interpret_env():
            return "CPU tensors need TRITON_INTERPRET=1 (set before importing triton)"
        from . import triton_kernels

        if not triton_kernels.INTERPRETED:
            return "kernels were compiled before TRITON_INTERPRET=1 was set"
        return "ok"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        if torch.version.cuda and torch.cuda.get_device_capability(device) < (7, 5):
            return "CUDA compute capability below 7.5"
        return "ok"
    return f"no Triton support for {device.type} tensors"


def resolve_backend(backend: str, x: Optional[torch.Tensor] = None) -> str:
    """Turn ``backend`` ('auto' or a name) into the backend that runs for input ``x``.

    'auto' first honours the ``DSCONV_EXT_BRA_BACKEND`` environment variable, then picks
    'triton' for CUDA tensors of a Triton dtype when Triton works there, else 'torch'.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            backend = env
    if x is None:
        return backend
    if backend == "auto":
        if x.is_cuda and x.dtype in TRITON_DTYPES and triton_status(x.device) == "ok":
            return "triton"
        return "torch"
    if backend == "triton":
        why = triton_status(x.device)
        if why != "ok":
            raise RuntimeError(f"backend='triton' cannot run on {x.device.type} tensors: {why}")
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' needs float16, bfloat16 or float32, got {x.dtype}")
    return backend


def triton_fits(props, *, dtype, dk, dv, wq, wk, backward, allow_tf32=None) -> Tuple[bool, str]:
    """Whether the Triton kernels for this problem fit a device with properties ``props``
    (``torch.cuda.get_device_properties``: compute capability, opt-in shared memory per block,
    registers, threads); returns (ok, why not). Pure: tests pass fake properties."""
    from .launch_config import choose_all, device_fits

    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"
    arch = 10 * int(props.major) + int(props.minor)
    smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 0) or None
    kernels = ("fwd", "bwd_preprocess", "bwd_dq", "bwd_dkdv") if backward else ("fwd",)
    cfgs = choose_all(dtype=dtype, dk=dk, dv=dv, wq=wq, wk=wk, precision=precision, arch=arch,
                      smem_limit=smem, kernels=kernels)  # fmt: skip
    return device_fits(props, cfgs)


_WARNED = set()


def _triton_guard(q, kv, r_weight, num_heads) -> bool:
    """True when the Triton launch fits the current device; else warns once per shape/config
    and the caller runs the torch backend instead (never an OutOfResources error)."""
    if not q.is_cuda:
        return True
    dk, dv = q.shape[-1] // num_heads, (kv.shape[-1] - q.shape[-1]) // num_heads
    backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, kv, r_weight)
    )
    props = torch.cuda.get_device_properties(q.device)
    ok, why = triton_fits(props, dtype=q.dtype, dk=dk, dv=dv, wq=q.shape[2], wk=kv.shape[2],
                          backward=backward)  # fmt: skip
    if not ok:
        key = (props.name, q.dtype, dk, dv, q.shape[2], kv.shape[2], backward)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"BiLevelRoutingAttention: Triton kernels do not fit {props.name} for "
                f"{q.dtype} head dims {dk}/{dv}, windows {q.shape[2]}/{kv.shape[2]} ({why}); "
                "running the torch backend",
                RuntimeWarning,
                stacklevel=3,
            )
    return ok


def routed_attention(q, kv, r_idx, r_weight, scale, num_heads, backend="torch"):
    """Routed attention core ``[B, P, Wq, H*Dk]`` -> ``[B, P, Wq, H*Dv]`` on the named backend.

    See :func:`dsconv_ext.bra.naive.routed_attention_naive` for the arguments.
    """
    if backend == "reference":
        from .naive import routed_attention_naive

        return routed_attention_naive(q, kv, r_idx, r_weight, scale, num_heads)
    if backend == "torch":
        from .torch_impl import routed_attention_torch

        return routed_attention_torch(q, kv, r_idx, r_weight, scale, num_heads)
    if backend == "triton":
        if not _triton_guard(q, kv, r_weight, num_heads):
            from .torch_impl import routed_attention_torch

            return routed_attention_torch(q, kv, r_idx, r_weight, scale, num_heads)
        from .autograd import routed_attention_triton

        return routed_attention_triton(q, kv, r_idx, r_weight, scale, num_heads)
    raise ValueError(f"unknown attention backend {backend!r}")


def bra_backend_report() -> Dict[str, str]:
    """What BiLevelRoutingAttention runs where, for ``python -m dsconv_ext info``.

    Keys: ``cpu`` / ``cuda`` (the backend ``backend='auto'`` runs for such tensors, or why not),
    ``triton`` (version or why it is unusable), ``interpreter``, ``env`` (the forcing variable),
    ``backends`` (all names).
    """
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    report: Dict[str, str] = {}
    try:
        report["cpu"] = resolve_backend("auto", torch.empty(0))
    except Exception as e:
        report["cpu"] = f"error: {e}"
    if torch.cuda.is_available():
        try:
            report["cuda"] = resolve_backend("auto", torch.empty(0, device="cuda"))
        except Exception as e:
            report["cuda"] = f"error: {e}"
        why = triton_status(torch.device("cuda"))
        if report["cuda"] != "triton" and why != "ok":
            report["cuda"] += f" (triton: {why})"
    else:
        report["cuda"] = "unavailable (no CUDA device)"
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception as e:  # pragma: no cover
        report["triton"] = f"not importable ({type(e).__name__}: {e})"
    why = triton_kernels_status()
    need = ", ".join(f"{k} >= {'.'.join(map(str, v))}" for k, v in MIN_VERSIONS.items())
    report["triton_kernels"] = "usable" if why == "ok" else f"unusable: {why}"
    report["triton_kernels"] += f" (needs {need})"
    report["interpreter"] = "on (Triton kernels run on CPU tensors)" if _interpret_env() else "off"
    report["env"] = f"{ENV_VAR}={forced or '<unset>'}"
    report["backends"] = ", ".join(BACKENDS)
    return report
