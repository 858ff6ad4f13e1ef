"""Compile-only check of the GEMV kernel for sm_90a: every autotune config, SASS instructions per weight.

No GPU needed: Triton compiles for `GPUTarget("cuda", 90, 64)` and its bundled `cuobjdump`
disassembles the cubin. Run it with the Triton the GPU machine has, e.g. 3.6.0 installed with
`pip install --target /tmp/t36 triton==3.6.0`:

    PYTHONPATH=/tmp/t36:$PWD python -m tokenfleet.kernels.compile_check

It prints one line per (bits, path, activation dtype, zero points, config): the SASS instructions
of the main K loop and those per weight (loop instructions / weights one thread handles per
iteration), the global loads in the loop by kind and width (`LDGSTS.128`: a 16-byte cp.async
into shared memory, prefetched STAGES chunks ahead; `LDG.16`: a 2-byte load the loop waits on),
how many times the 16-byte loads cover the thread's weight bytes (1.00: each byte once, all of
it 16 B at a time), registers per thread and spilled bytes (`cuobjdump -res-usage`) and shared
memory. The portable unpack and the inline-PTX int4 path (`ASM`) are both compiled. A config
fails the check if it does not compile or, in a variant the GPU runs (int4 PTX, int8), spills;
symmetric ones also fail with more than 128 registers (occupancy) or a sub-word load the loop
waits on. The rest is printed as WARN.
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


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def _loop(cubin: bytes) -> list[str]:
    """The SASS instructions of the longest backward-branch loop (the K loop) of a cubin."""
    sass = _cuobjdump(cubin, "-sass")
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s*(.*?);", sass)]
    best: list[str] = []
    for addr, text in ins:
        target = re.search(r"BRA .*?(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            begin = int(target.group(1), 16)
            body = [t for a, t in ins if begin <= a <= addr]
            best = body if len(body) > len(best) else best
    return best


def loop_instructions(cubin: bytes) -> int:
    """SASS instructions in the longest backward-branch loop (the K loop) of a cubin."""
    return len(_loop(cubin))


_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "U8": 1, "S8": 1, "S16": 2}


def loop_loads(cubin: bytes) -> dict[str, int]:
    """Global loads in the K loop by opcode and width (`LDGSTS.E.BYPASS.128`: a 16-byte cp.async,
    `LDG.E.U16`: a 2-byte load waited on in the loop), e.g. {"LDGSTS.128": 4, "LDGSTS.32": 1}."""
    counts: dict[str, int] = {}
    for text in _loop(cubin):
        m = re.search(r"\b(LDGSTS|LDG)((?:\.[A-Z0-9_]+)*)\b", text)
        if not m:
            continue
        width = next((w for w in m.group(2).split(".") if w in _LOAD_BYTES), "")
        key = f"{m.group(1)}.{_LOAD_BYTES.get(width, 4) * 8}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread, stack and local memory bytes (spills), from `cuobjdump -res-usage`."""
    usage = _cuobjdump(cubin, "-res-usage")
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage)}


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
                        compiled = compile_gemv(config, bits=bits, asm=asm, zp=zp, dtype=dtype)
                        cubin = compiled.asm["cubin"]
                        n = loop_instructions(cubin)
                        loads = loop_loads(cubin)
                        res = resources(cubin)
                    except Exception as exc:  # report every config, then fail
                        failed += 1
                        print(f"FAIL {label}: {exc!r}"[:400], flush=True)
                        continue
                    # One loop iteration is one chunk: BLOCK_N x W words, W = 32 for K = 4096.
                    words = kw["BLOCK_N"] * 32 / (config.num_warps * 32)  # per thread
                    per_weight = n / (words * (32 // bits))
                    weight_loads = sum(v for k, v in loads.items() if k.endswith(".128"))
                    spills = res.get("stack", 0) + res.get("local", 0)
                    # Spills fail the variants a GPU runs (int4 with 16-bit activations takes
                    # the PTX path there, int8 the portable one); the portable int4 unpack with
                    # 16-bit activations runs only under the interpreter, so it gets a warning.
                    # Over 128 registers (occupancy) and a sub-word load the loop waits on fail
                    # the symmetric variants the GPU runs; asymmetric ones load a zero point per
                    # slice and only get a warning.
                    gpu_runs = asm or bits == 8
                    bad: list[str] = []
                    warn: list[str] = []
                    if spills:
                        (bad if gpu_runs else warn).append("SPILLS")
                    if loads.get("LDG.16") or loads.get("LDG.8"):
                        (bad if gpu_runs and not zp else warn).append("sub-word load waited on in the loop")
                    if (res.get("reg") or 0) > 128:
                        (bad if gpu_runs and not zp else warn).append("over 128 registers")
                    line = (
                        f"{label}: loop {n} SASS, {per_weight:.2f} per weight; "
                        f"loads/iter {dict(sorted(loads.items()))} "
                        f"(16-byte loads cover {weight_loads * 16 / (words * 4):.2f}x the weight bytes); "
                        f"regs {res.get('reg')}, spill bytes {spills}, smem {compiled.metadata.shared}"
                    )
                    if bad:
                        failed += 1
                        line = f"FAIL {line} ({', '.join(bad)})"
                    elif warn:
                        line = f"WARN {line} ({', '.join(warn)})"
                    print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
