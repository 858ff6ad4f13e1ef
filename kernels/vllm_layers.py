"""The vLLM side: torch custom ops over our kernels, and the layer classes that call them.

Imported only by the plugin, and only when it registers something (a CUDA device is present),
so nothing here runs on the CPU build's hot path. The kernels are wrapped as torch custom ops
so that torch.compile (vLLM -O2/-O3) treats each as one opaque, in-place call instead of tracing
into Triton autotuner state.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
    MPLinearKernel,
    MPLinearLayerConfig,
)
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.scalar_type import scalar_types

from tokenfleet.kernels.quant import from_compressed_tensors


def define_torch_ops() -> None:
    """torch.ops.tokenfleet.{fused_add_rms_norm, rms_norm, silu_and_mul, w4a16_gemm}; once per process."""
    if hasattr(torch.ops.tokenfleet, "w4a16_gemm"):
        return

    # The bodies look the kernel modules up at call time (not through this module's globals), so
    # the ops follow whichever copy is imported: tests re-import the kernels under the interpreter.
    @torch.library.custom_op("tokenfleet::fused_add_rms_norm", mutates_args=("x", "residual"))
    def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        from tokenfleet.kernels import rmsnorm

        rmsnorm.fused_add_rms_norm(x, residual, weight, eps)

    @fused_add_rms_norm.register_fake
    def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        return None

    @torch.library.custom_op("tokenfleet::rms_norm", mutates_args=())
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from tokenfleet.kernels import rmsnorm

        return rmsnorm.rms_norm(x, weight, eps)

    @rms_norm.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.custom_op("tokenfleet::silu_and_mul", mutates_args=())
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        from tokenfleet.kernels import activation

        return activation.silu_and_mul(x)

    @silu_and_mul.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @torch.library.custom_op("tokenfleet::w4a16_gemm", mutates_args=())
    def w4a16_gemm(
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        group_size: int,
        width: int,
    ) -> torch.Tensor:
        from tokenfleet.kernels import gemv, quant, wgemm

        shape = (qweight.shape[0], qweight.shape[1] * 8)
        if width:  # repacked at load: the GEMV for decode batches, the GEMM above
            return wgemm.w4a16_gemm(x, gemv.GemvWeight(qweight, scales, zeros, 4, group_size, shape, width))
        return wgemm.w4a16_gemm(x, quant.QuantizedWeight(qweight, scales, zeros, 4, group_size, shape))

    @w4a16_gemm.register_fake
    def _(
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        group_size: int,
        width: int,
    ) -> torch.Tensor:
        return x.new_empty((x.shape[0], qweight.shape[0]))


class TritonRMSNorm(RMSNorm):
    """vLLM's RMSNorm with our kernels on CUDA; anything they do not cover goes to vLLM's path."""

    def _ours(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        return (
            self.has_weight
            and self.variance_size_override is None
            and x.is_contiguous()
            and self.weight.dtype == x.dtype
            and (residual is None or (residual.is_contiguous() and residual.shape == x.shape))
        )

    def forward_cuda(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self._ours(x, residual):
            return super().forward_cuda(x, residual)
        if residual is None:
            return torch.ops.tokenfleet.rms_norm(x, self.weight.data, self.variance_epsilon)
        torch.ops.tokenfleet.fused_add_rms_norm(x, residual, self.weight.data, self.variance_epsilon)
        return x, residual


class TritonSiluAndMul(SiluAndMul):
    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            return super().forward_cuda(x)
        return torch.ops.tokenfleet.silu_and_mul(x)


class TokenfleetW4A16LinearKernel(MPLinearKernel):
    """compressed-tensors W4A16 (`pack-quantized`, uint4b8 or uint4 + zero points) on our GEMM.

    Loading repacks weight_packed into the GEMV layout (kernels/gemv.py) and unpacks zero points;
    decode batches (M <= 16) then take the GEMV, larger ones the GEMM over the same words.
    """

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        if c.weight_type not in (scalar_types.uint4b8, scalar_types.uint4):
            return False, f"weight type {c.weight_type} is not 4-bit"
        if c.act_type not in (torch.float16, torch.bfloat16):
            return False, f"activation dtype {c.act_type} is not fp16/bf16"
        in_features = c.partition_weight_shape[0]
        if in_features % 8:
            return False, "input features per partition must be a multiple of 8"
        if c.group_size != -1 and in_features % c.group_size:
            return False, f"group size {c.group_size} does not divide {in_features}"
        if c.zero_points != (c.weight_type == scalar_types.uint4):
            return False, "zero points are expected exactly for uint4"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from tokenfleet.kernels.gemv import GemvWeight, gemv_width, repack_for_gemv
        from tokenfleet.kernels.wgemm import planar_gemm_supported

        k, n = self.config.partition_weight_shape
        tensors: dict[str, Any] = {
            "weight_packed": getattr(layer, self.w_q_name).data,
            "weight_scale": getattr(layer, self.w_s_name).data,
            "weight_shape": torch.tensor([n, k]),
        }
        if self._has_zeros(layer):
            tensors["weight_zero_point"] = getattr(layer, self.w_zp_name).data
        # Validates shapes once; the layer keeps the tensors as parameters (moved and seen by
        # torch.compile like any other weight), zero points unpacked to int8 [N, groups].
        qw = from_compressed_tensors(tensors, num_bits=4)
        # Repacked once into the GEMV layout when both kernels can read it (same size, so the
        # checkpoint's order is not kept); otherwise the GEMM reads the checkpoint's order.
        width = gemv_width(k, qw.group_size, 4)
        if width is not None and planar_gemm_supported(
            GemvWeight(qw.qweight, qw.scales, None, 4, qw.group_size, (n, k), width)
        ):
            packed = repack_for_gemv(qw).qweight
            self._transform_param(layer, self.w_q_name, lambda _: packed)
        else:
            width = 0
            self._transform_param(layer, self.w_q_name, lambda _: qw.qweight)
        layer.tokenfleet_width = width
        self._transform_param(layer, self.w_s_name, lambda _: qw.scales)
        if qw.zeros is not None:
            zeros = qw.zeros
            self._transform_param(layer, self.w_zp_name, lambda _: zeros)
        layer.tokenfleet_group_size = qw.group_size

    def _has_zeros(self, layer: torch.nn.Module) -> bool:
        return self.w_zp_name is not None and getattr(layer, self.w_zp_name, None) is not None

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        qweight = getattr(layer, self.w_q_name)
        zeros = getattr(layer, self.w_zp_name) if self._has_zeros(layer) else None
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.ops.tokenfleet.w4a16_gemm(
            x2,
            qweight,
            getattr(layer, self.w_s_name),
            zeros,
            layer.tokenfleet_group_size,
            layer.tokenfleet_width,
        )
        if bias is not None:
            y.add_(bias)
        return y.reshape(*x.shape[:-1], qweight.shape[0])
