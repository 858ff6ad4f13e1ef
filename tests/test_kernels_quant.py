"""The weight-only layout: int4 packing, round trips with compressed-tensors `pack-quantized`, and
the reference quantiser's error bound, the GEMV layout's repack. Plain torch: no kernels run here."""

from __future__ import annotations

import pytest
import torch

from tokenfleet.kernels._runtime import KernelInputError
from tokenfleet.kernels.gemv import gemv_width, pack_planar, repack_for_gemv, unpack_gemv, unpack_planar
from tokenfleet.kernels.quant import (
    QuantizedWeight,
    dequantize,
    from_compressed_tensors,
    pack_int4,
    quantize_rtn,
    to_compressed_tensors,
    unpack_int4,
)


@pytest.mark.parametrize(("n", "k"), [(1, 8), (3, 24), (16, 64)])
def test_int4_pack_unpack_round_trip(n: int, k: int) -> None:
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(k))
    packed = pack_int4(q)
    assert packed.shape == (n, k // 8)
    assert packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed), q)


def test_int4_layout_is_low_nibble_first_unsigned() -> None:
    # Element k sits at bits 4·(k mod 8) as q + 8: [-8, -7, ..., -1] -> nibbles 0..7.
    q = torch.arange(-8, 0, dtype=torch.int8).reshape(1, 8)
    assert int(pack_int4(q)[0, 0]) == 0x76543210


def test_pack_int4_rejects_bad_input() -> None:
    with pytest.raises(KernelInputError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 8), 8, dtype=torch.int8))
    with pytest.raises(KernelInputError, match="K % 8"):
        pack_int4(torch.zeros((1, 7), dtype=torch.int8))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("n", "group"), [(20, 16), (24, 64)])  # 20: zero points padded when packed
def test_round_trip_with_compressed_tensors(bits: int, symmetric: bool, n: int, group: int) -> None:
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    k = 64
    qw = quantize_rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(n)), bits, group, symmetric)
    q = unpack_int4(qw.qweight) if bits == 4 else qw.qweight
    # What compressed-tensors' own compressor writes for this quantised weight.
    theirs = {
        "weight_packed": helpers.pack_to_int32(q, bits),
        "weight_scale": qw.scales,
        "weight_shape": torch.tensor([n, k]),
    }
    if not symmetric:
        assert qw.zeros is not None
        theirs["weight_zero_point"] = helpers.pack_to_int32(qw.zeros, bits, packed_dim=0)
    ours = to_compressed_tensors(qw)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    loaded = from_compressed_tensors(theirs, num_bits=bits)
    assert torch.equal(loaded.qweight, qw.qweight)
    assert (loaded.group_size, loaded.shape, loaded.symmetric) == (group, (n, k), symmetric)
    assert torch.equal(dequantize(loaded), dequantize(qw))
    unpacked = helpers.unpack_from_int32(ours["weight_packed"], bits, torch.Size([n, k]))
    assert torch.equal(unpacked, q)


def test_per_channel_checkpoint_gives_group_k() -> None:
    qw = quantize_rtn(torch.randn(8, 32), 4, 32)
    ct = to_compressed_tensors(qw)
    assert ct["weight_scale"].shape == (8, 1)
    assert from_compressed_tensors(ct, num_bits=4).group_size == 32


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_within_half_a_step(bits: int, symmetric: bool) -> None:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    qw = quantize_rtn(w, bits, 32, symmetric)
    step = qw.scales.repeat_interleave(32, dim=1)
    assert bool(((dequantize(qw) - w).abs() <= step / 2 + 1e-6).all())


def test_quantized_weight_validates_layout() -> None:
    scales = torch.ones(4, 2)
    with pytest.raises(KernelInputError, match="K % 8"):
        QuantizedWeight(torch.zeros(4, 1, dtype=torch.int32), torch.ones(4, 1), None, 4, 12, (4, 12))
    with pytest.raises(KernelInputError, match="must divide"):
        QuantizedWeight(torch.zeros(4, 4, dtype=torch.int32), scales, None, 4, 24, (4, 32))
    with pytest.raises(KernelInputError, match="qweight must be"):
        QuantizedWeight(torch.zeros(4, 32, dtype=torch.int8), scales, None, 4, 16, (4, 32))
    with pytest.raises(KernelInputError, match="zeros must be"):
        QuantizedWeight(torch.zeros(4, 4, dtype=torch.int32), scales, torch.zeros(4, 2), 4, 16, (4, 32))
    with pytest.raises(KernelInputError, match="missing"):
        from_compressed_tensors({"weight_packed": torch.zeros(1, 1, dtype=torch.int32)}, num_bits=4)


# --- the GEMV layout (kernels/gemv.py): planar words, repacked once at load --------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("n", "k", "group"), [(3, 256, 128), (5, 512, 512), (2, 48, 48), (4, 96, 32)])
def test_gemv_repack_round_trip(bits: int, symmetric: bool, n: int, k: int, group: int) -> None:
    qw = quantize_rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(k)), bits, group, symmetric)
    gw = repack_for_gemv(qw)
    assert gw.qweight.dtype == torch.int32
    assert gw.qweight.shape == (n, k * bits // 32), "same size as the pack-quantized tensor"
    if bits == 4:
        assert gw.nbytes() == qw.nbytes()
    back = unpack_gemv(gw)
    assert torch.equal(back.qweight, qw.qweight)
    assert torch.equal(dequantize(back), dequantize(qw))
    q = unpack_int4(qw.qweight) if bits == 4 else qw.qweight
    assert torch.equal(unpack_planar(pack_planar(q, bits, gw.width), bits, gw.width), q)
    # From a compressed-tensors checkpoint to the GEMV layout and back.
    loaded = from_compressed_tensors(to_compressed_tensors(qw), num_bits=bits)
    assert torch.equal(unpack_gemv(repack_for_gemv(loaded)).qweight, qw.qweight)


def test_gemv_layout_fields() -> None:
    # Width 2, int4: chunk of 16 elements; word j holds elements i·2 + j at bits 4·i.
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    words = pack_planar(q, 4, 2)
    assert words.shape == (1, 2)
    for j in range(2):
        fields = [(int(words[0, j]) >> (4 * i)) & 0xF for i in range(8)]
        assert fields == [int(q[0, 2 * i + j]) + 8 for i in range(8)]


@pytest.mark.parametrize(
    ("k", "group", "bits", "width"),
    [(4096, 128, 4, 32), (14336, 128, 4, 32), (4096, 4096, 4, 32), (4096, 128, 8, 32), (48, 48, 4, 2),
     (96, 32, 4, 4), (12, 6, 8, None), (40, 40, 4, 1)],
)  # fmt: skip
def test_gemv_width(k: int, group: int, bits: int, width: int | None) -> None:
    assert gemv_width(k, group, bits) == width


# --- the int4 inline-PTX dequantisation (gemv._I4_ASM), bit by bit ---------------------------
# The GPU runs this PTX on its tensor-core tiles; the interpreter cannot, so here a small model of
# the five PTX instructions it uses executes the kernel's actual asm text on planar words.


def _half_to_float(bits16: int, kind: str) -> float:
    import numpy as np

    if kind == "bf16x2":
        return float(np.array([bits16 << 16], dtype=np.uint32).view(np.float32)[0])
    return float(np.array([bits16], dtype=np.uint16).view(np.float16)[0])


def _float_to_half(value: float, kind: str) -> int:
    import numpy as np

    if kind == "bf16x2":
        word = int(np.array([value], dtype=np.float32).view(np.uint32)[0])
        assert word & 0xFFFF == 0, f"{value} is not exact in bf16"
        return word >> 16
    half = np.array([value], dtype=np.float16)
    assert float(half[0]) == value, f"{value} is not exact in fp16"
    return int(half.view(np.uint16)[0])


def _run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Executes the straight-line PTX of `_I4_ASM` (mov, prmt, lop3, shr, fma.rn on 16-bit pairs)."""
    regs = dict(operands)

    def val(tok: str) -> int:
        return int(tok, 16) if tok.startswith("0x") else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        if op == "mov.b32":
            out = val(args[1])
        elif op == "prmt.b32":
            pool = val(args[1]) | (val(args[2]) << 32)
            sel = val(args[3])
            assert sel & 0x8888 == 0, "no sign replication"
            out = sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "lop3.b32":
            a, b, c, lut = (val(t) for t in args[1:])
            out = 0
            for bit in range(32):
                idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
                out |= ((lut >> idx) & 1) << bit
        elif op == "shr.u32":
            out = val(args[1]) >> int(args[2])
        elif op.startswith("fma.rn."):
            kind = op.split(".")[2]
            a, b, c = (val(t) for t in args[1:])
            out = 0
            for h in range(2):
                x, y, z = ((v >> (16 * h)) & 0xFFFF for v in (a, b, c))
                r = _half_to_float(x, kind) * _half_to_float(y, kind) + _half_to_float(z, kind)
                out |= _float_to_half(r, kind) << (16 * h)
        else:
            raise AssertionError(f"unmodelled PTX instruction {op}")
        regs[args[0]] = out & 0xFFFFFFFF
    return regs


@pytest.mark.parametrize("dtype", ["bf16x2", "f16x2"])
def test_int4_asm_dequantises_planar_words(dtype: str) -> None:
    from tokenfleet.kernels import gemv

    asm = (gemv._I4_ASM_BF16 if dtype == "bf16x2" else gemv._I4_ASM_FP16).value
    assert gemv._I4_CONSTRAINTS.value.count("=r") == 8
    q = torch.randint(-8, 8, (1, 8 * 4), dtype=torch.int8, generator=torch.Generator().manual_seed(7))
    q[0, :16] = torch.arange(-8, 8, dtype=torch.int8)  # every value at least once
    words = pack_planar(q, 4, 4)[0].tolist()  # one chunk, W = 4: word j holds q[i·4 + j]
    for j in (0, 2):  # pack=2: a thread's neighbouring words j, j + 1 go in as $8, $9
        regs = _run_ptx(asm, {"$8": words[j] & 0xFFFFFFFF, "$9": words[j + 1] & 0xFFFFFFFF})
        for i in range(8):  # output $i: (slice i of word j, slice i of word j + 1), low half first
            got = [_half_to_float((regs[f"${i}"] >> (16 * h)) & 0xFFFF, dtype) for h in range(2)]
            assert got == [float(q[0, i * 4 + j]), float(q[0, i * 4 + j + 1])]
