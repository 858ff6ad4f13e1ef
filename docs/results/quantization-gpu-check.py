"""GPU check for the GPU-only techniques (docs/results/quantization-discussion.md).

Quantizes tiny-code with rtn-fp8 and gptq-w8a16 through the pipeline's own worker
(engine/quantize/worker.py, llm-compressor 0.14.0.1) and scores each checkpoint's perplexity with
transformers (bf16, on the GPU) on the held-out windows of the CPU report. Run on the device
machine from the repository root with the tiny-code files and the pipeline's data.json in
.gpumodel/ and llm-compressor's wheels on PYTHONPATH; results go to $OUT/gpu_results.json.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ["OUT"])
MODEL = Path(".gpumodel").resolve()
data = json.loads((MODEL / "data.json").read_text())
results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}


def ppl(path: Path) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in data["evaluation"]:
            ids = torch.tensor([w], device="cuda")
            logits = model(ids).logits.float()
            lp = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None])
            nll -= float(lp.sum())
            n += ids.shape[1] - 1
    return math.exp(nll / n)


results["baseline_ppl"] = ppl(MODEL)
for name, method, scheme in [("rtn-fp8", "rtn", "FP8_DYNAMIC"), ("gptq-w8a16", "gptq", "W8A16")]:
    out = Path(f"/tmp/ckpt/{name}")
    job = {
        "model_dir": str(MODEL),
        "out_dir": str(out),
        "method": method,
        "scheme": scheme,
        "group_size": 64,
        "smoothing_strength": 0.8,
        "threads": 8,
        "seed": 0,
        "calibration": str(MODEL / "data.json") if method != "rtn" else None,
    }
    jp = Path(f"/tmp/{name}.json")
    jp.write_text(json.dumps(job))
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-P", "engine/quantize/worker.py", str(jp)], capture_output=True, text=True
    )
    (OUT / f"{name}.log").write_text(p.stdout[-20000:] + p.stderr[-20000:])
    r = {"rc": p.returncode, "wall_s": round(time.time() - t0, 1)}
    if p.returncode == 0:
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        r["quantization_config"] = cfg
        r["weights_mb"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6, 3)
        try:
            r["ppl"] = ppl(out)
            r["recovery"] = results["baseline_ppl"] / r["ppl"]
        except Exception as exc:  # the error is the result to report
            r["ppl_error"] = repr(exc)[:2000]
    results[name] = r
    print(name, {k: v for k, v in r.items() if k != "quantization_config"}, flush=True)
(OUT / "gpu_results.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results, indent=1)[:4000])
