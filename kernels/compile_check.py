"""Compile-only check of the GEMV kernel for sm_90a: every autotune config, SASS instructions per weight.

No GPU needed: Triton compiles for `GPUTarget("cuda", 90, 64)` and its bundled `cuobjdump`
disassembles the cubin. Run it with the Triton the GPU machine has, e.g. 3.6.0 installed with
`pip install --target /tmp/t36 triton==3.6.0`:

    PYTHONPATH=/tmp/t36:$PWD python -m tokenfleet.kernels.compile_check

It prints one line per (bits, path, activation dtype, zero points, config): the SASS instructions
of the main K loop and those per weight (loop instructions / weights one thread handles per
iteration). The portable unpack and the inline-PTX int4 path (`ASM`) are both compiled.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tokenfleet.kernels import gemv

TARGET = GPUTarget("cuda", 90, 64)
_PTRS = ("x_ptr", "q_ptr", "s_ptr", "z_ptr", "out_ptr", "ws_ptr", "cnt_ptr")
_DIVISIBLE = (*_PTRS, "N", "K", "words_per_row")


def compile_gemv(
    config: triton.Config,
    *,
    bits: int,
    asm: bool,
    zp: bool,
    dtype: str = "bf16",
    k: int = 4096,
    group: int = 128,
) -> Any:
    """The compiled kernel (cubin in `.asm["cubin"]`) for one config, without launching it."""
    width = gemv.gemv_width(k, group, bits)
    assert width is not None
    slices_per_group = min(group, (32 // bits) * width) // width
    consts = {
        "GROUP": group, "BITS": bits, "W": width, "SLICES_PER_GROUP": slices_per_group, "HAS_ZP": zp,
        "ASM": asm, **config.kwargs,
    }  # fmt: skip
    ptr_types = {"ws_ptr": "*fp32", "q_ptr": "*i32", "cnt_ptr": "*i32"}
    names = gemv._gemv_kernel.arg_names
    signature = {
        a: "constexpr" if a in consts else ptr_types.get(a, f"*{dtype}") if a in _PTRS else "i32"
        for a in names
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a in _DIVISIBLE}
    source = ASTSource(
        fn=gemv._gemv_kernel,
        signature=signature,
        constexprs={(names.index(a),): v for a, v in consts.items()},
        attrs=attrs,
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=TARGET, options=options)


def loop_instructions(cubin: bytes) -> int:
    """SASS instructions in the longest backward-branch loop (the K loop) of a cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s*(.*?);", sass)]
    best = 0
    for addr, text in ins:
        target = re.search(r"BRA .*?(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            begin = int(target.group(1), 16)
            best = max(best, sum(1 for a, _ in ins if begin <= a <= addr))
    return best


def main() -> int:
    failed = 0
    for bits in (4, 8):
        for asm in (False, True) if bits == 4 else (False,):
            for dtype, zp in (("bf16", False), ("bf16", True), ("fp16", False)):
                for config in gemv._FMA_CONFIGS + gemv._DOT_CONFIGS:
                    kw = config.kwargs
                    label = (
                        f"int{bits} {'asm' if asm else 'portable'} {dtype} {'zp' if zp else 'sym'} "
                        f"BLOCK_M={kw['BLOCK_M']} BLOCK_N={kw['BLOCK_N']} SPLIT_K={kw['SPLIT_K']} "
                        f"warps={config.num_warps} stages={config.num_stages}"
                    )
                    try:
                        n = loop_instructions(
                            compile_gemv(config, bits=bits, asm=asm, zp=zp, dtype=dtype).asm["cubin"]
                        )
                    except Exception as exc:  # report every config, then fail
                        failed += 1
                        print(f"FAIL {label}: {exc!r}"[:400], flush=True)
                        continue
                    per_thread = kw["BLOCK_N"] * 32 * (32 // bits) / (config.num_warps * 32)
                    print(f"{label}: loop {n} SASS, {n / per_thread:.2f} per weight", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
