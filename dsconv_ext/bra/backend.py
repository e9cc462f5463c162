"""Which attention backend runs where, and the dispatch of the routed-attention core."""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

__all__ = ["BACKENDS", "ENV_VAR", "bra_backend_report", "resolve_backend", "routed_attention"]

BACKENDS = ("auto", "reference", "torch", "triton")
ENV_VAR = "DSCONV_EXT_BRA_BACKEND"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_status(device: Optional[torch.device] = None) -> str:
    """'ok' when the Triton kernels can run on ``device`` (CPU: the interpreter), else why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton ships with CUDA torch
        return f"triton not importable ({type(e).__name__}: {e})"
    device = torch.device("cpu") if device is None else torch.device(device)
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
    report["interpreter"] = "on (Triton kernels run on CPU tensors)" if _interpret_env() else "off"
    report["env"] = f"{ENV_VAR}={forced or '<unset>'}"
    report["backends"] = ", ".join(BACKENDS)
    return report
