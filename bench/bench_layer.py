#!/usr/bin/env python3
"""Experts layer benchmark: moe-fused vs Transformers v5 eager / grouped_mm.

The logic lives in moe_fused/bench.py (so `moe-fused bench` works from an installed
package); this script is the same thing run from a source checkout:

    python bench/bench_layer.py                    # CPU, scaled-down Qwen3-30B-A3B
    python bench/bench_layer.py --device cuda      # Qwen3-30B-A3B / 235B-A22B, T = 512, 4096, 16384
    python bench/bench_layer.py --help
"""

import importlib.util
import pathlib
import sys

if importlib.util.find_spec("moe_fused") is None:  # source checkout, not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))

from moe_fused.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
