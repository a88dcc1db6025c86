#!/usr/bin/env python3
"""Timing-only builds of the row GEMMs without (some of) their epilogue stores, as
bench/device/ab.sh overlays: dev/ab/<name>/csrc/cuda/sm90_rowgemm.cu.

    python3 dev/sm90/rowgemm_store_overlays.py     # writes dev/ab/g1n, dev/ab/g1a, dev/ab/stn
    AB_SHAPES="30b-a3b:4096,16384" AB_ROUNDS=3 bash bench/device/ab.sh \\
        g1n=+dev/ab/g1n g1a=+dev/ab/g1a stn=+dev/ab/stn          # carry ["dev/ab"]

Variants (their outputs are WRONG: time them, never test them):
  g1n  GEMM1 (EPI_SWIGLU) stores nothing: mainloop and the epilogue's register math only
  g1a  GEMM1 stores h (g, u) but not a
  stn  GEMM2 and dX (EPI_STORE) skip their full-tile TMA stores (partial tiles still store)
What GEMM1's 0.6 GB of h and a, and GEMM2's / dX's 0.5 GB of rows, cost (notes/hopper.md,
session 16); dA''s own stores: dev/sm90/da_diag_overlays.py. The edits are textual, on the
current kernel; an anchor that no longer matches stops the script with its name.
"""
import sys

from overlays import write_overlays

SRC = "csrc/cuda/sm90_rowgemm.cu"

# (name, anchor, replacement): the anchor must occur exactly once in the source.
EDITS = [
    ("knob",
     "constexpr bool kHRing = MOE_SM90_DA_H_RING != 0;",
     "constexpr bool kHRing = MOE_SM90_DA_H_RING != 0;\n"
     "// dev/sm90/rowgemm_store_overlays.py: timing-only build, WRONG outputs\n"
     "#define DIAG_G1 @G1@  // 1: GEMM1 stores nothing, 2: GEMM1 stores no a\n"
     "#define DIAG_ST @ST@  // 1: EPI_STORE skips its full-tile TMA stores"),
    ("GEMM1's g pass",
     "if constexpr (EPI == EPI_SWIGLU) pass(g_of, hrow, &maps.c, col);",
     "if constexpr (EPI == EPI_SWIGLU && DIAG_G1 != 1) pass(g_of, hrow, &maps.c, col);"),
    ("GEMM1's u pass",
     "if constexpr (EPI == EPI_SWIGLU)\n            pass([&](int j, int hh, int i) { return acc[(j + HJ) * 4",
     "if constexpr (EPI == EPI_SWIGLU && DIAG_G1 != 1)\n            pass([&](int j, int hh, int i) { return acc[(j + HJ) * 4"),
    ("GEMM1's a pass",
     "pass(g_of,  // a, now in g's registers",
     "if (EPI != EPI_SWIGLU || DIAG_G1 == 0) pass(g_of,  // a, now in g's registers"),
    ("EPI_STORE's TMA stores",
     "            store_pass_tma<T>(\n",
     "            if (DIAG_ST == 0) store_pass_tma<T>(\n"),
]
VARIANTS = {"g1n": {"G1": 1, "ST": 0}, "g1a": {"G1": 2, "ST": 0}, "stn": {"G1": 0, "ST": 1}}


def main() -> int:
    return write_overlays(SRC, EDITS, VARIANTS)


if __name__ == "__main__":
    sys.exit(main())
