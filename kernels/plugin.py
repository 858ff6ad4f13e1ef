"""vLLM general plugin (`vllm.general_plugins` entry point `tokenfleet_kernels`).

vLLM calls `register()` once in every process it starts (API server, engine core, workers), and
a process may call it again: it is idempotent. Which kernels to install comes from
$TOKENFLEET_KERNELS (set by engine/launch.py from `spec.engine.kernels`). Without a CUDA device
nothing is registered and vLLM keeps its own ops; the reason is logged once per process.
"""

from __future__ import annotations

import logging
import os

from tokenfleet.kernels.names import KERNELS_ENV, parse_enabled

# Under vLLM's "vllm" logger so the lines reach the server log with vLLM's own formatting.
logger = logging.getLogger("vllm.tokenfleet.kernels")

# kernel name -> what was done in this process ("registered" or why not).
_status: dict[str, str] = {}


def status() -> dict[str, str]:
    return dict(_status)


def unavailable_reason() -> str | None:
    """Why our kernels cannot run in this process, or None if they can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (vLLM's own ops stay in place)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def register() -> None:
    """The entry point: install the kernels named in $TOKENFLEET_KERNELS, at most once each."""
    try:
        kernels = parse_enabled(os.environ.get(KERNELS_ENV))
    except ValueError as exc:
        logger.error("tokenfleet kernels: %s; none registered", exc)
        return
    pending = [name for name in kernels if name not in _status]
    if not pending:
        return
    reason = unavailable_reason()
    if reason is not None:
        for name in pending:
            _status[name] = f"not registered: {reason}"
        logger.info("tokenfleet kernels %s not registered: %s", ",".join(pending), reason)
        return
    for name in pending:
        _status[name] = _REGISTRARS[name]()
    logger.info("tokenfleet kernels: %s", ", ".join(f"{k} {v}" for k, v in _status.items()))


def _register_oot(vllm_cls: type, ours: type) -> str:
    from vllm.model_executor.custom_op import op_registry_oot

    current = op_registry_oot.get(vllm_cls.__name__)
    if current is ours:
        return "registered"
    if current is not None:
        return f"not registered: {vllm_cls.__name__} already replaced by {current.__qualname__}"
    vllm_cls.register_oot(ours)  # type: ignore[attr-defined]
    return "registered"


def _register_rms_norm() -> str:
    from vllm.model_executor.layers.layernorm import RMSNorm

    from tokenfleet.kernels import vllm_layers

    vllm_layers.define_torch_ops()
    return _register_oot(RMSNorm, vllm_layers.TritonRMSNorm)


def _register_silu_and_mul() -> str:
    from vllm.model_executor.layers.activation import SiluAndMul

    from tokenfleet.kernels import vllm_layers

    vllm_layers.define_torch_ops()
    return _register_oot(SiluAndMul, vllm_layers.TritonSiluAndMul)


def _register_w4a16_gemm() -> str:
    # vLLM picks a mixed-precision kernel from a per-platform priority list and has no
    # registration API for it; putting ours first is the only hook (pinned to vLLM 0.32;
    # VLLM_DISABLED_KERNELS=TokenfleetW4A16LinearKernel turns it off).
    from vllm.model_executor.kernels import linear
    from vllm.platforms import PlatformEnum

    from tokenfleet.kernels.vllm_layers import TokenfleetW4A16LinearKernel, define_torch_ops

    define_torch_ops()
    kernels = linear._POSSIBLE_KERNELS.setdefault(PlatformEnum.CUDA, [])
    if not any(k.__name__ == TokenfleetW4A16LinearKernel.__name__ for k in kernels):
        kernels.insert(0, TokenfleetW4A16LinearKernel)
    return "registered"


_REGISTRARS = {
    "rms_norm": _register_rms_norm,
    "silu_and_mul": _register_silu_and_mul,
    "w4a16_gemm": _register_w4a16_gemm,
}
