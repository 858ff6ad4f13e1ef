"""Moved to `tokenfleet.builtin_model.tiny_code`; these names stay importable from here for the
quantization pipeline (engine/quantize/data.py), whose owners switch its import separately."""

from __future__ import annotations

from tokenfleet.builtin_model.tiny_code import REPORT_NAME, split_of, spread

__all__ = ["REPORT_NAME", "split_of", "spread"]
