"""The quantization pipeline: quantize with several techniques, evaluate side by side, report.

`tokenfleet quantize -c pipeline.yaml` runs it (ADR 0010). Decisions (which techniques a device
can run, which steps are stale) are pure functions in `techniques`, `checks` and `steps`; the
quantization itself runs in its own virtual environment (`venv`, `worker`), evaluation in the
engine environment (`evaluate`).
"""
