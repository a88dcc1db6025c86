#!/usr/bin/env python3
"""Timing-only builds of dA' (row_gemm_sm90, EPI_DSWIGLU) with parts of its epilogue cut out,
as bench/device/ab.sh overlays: dev/ab/da<N>/csrc/cuda/sm90_rowgemm.cu for each level N.

    python3 dev/sm90/da_diag_overlays.py            # writes dev/ab/da1 .. dev/ab/da4
    AB_SHAPES="30b-a3b:4096,16384" AB_ROUNDS=3 bash bench/device/ab.sh \\
        da1=+dev/ab/da1 da2=+dev/ab/da2 da3=+dev/ab/da3 da4=+dev/ab/da4   # carry ["dev/ab"]

Levels (the outputs are WRONG in every one of them: time them, never test them):
  1  the epilogue waits for and releases its h-stages and does nothing else (mainloop + h loads)
  2  its math and smem work, without the dh and s*a global stores
  3  everything but the dh stores (16-byte stores from the chunk buffer)
  4  everything but the s*a stores (4-byte stores from registers)
Session 14 measured 1 and 2 (bench/results/ab_session14_da_epilogue_h100.txt): 0.709 and
0.821 ms against 0.998 at 30B-A3B T=16384; session 15 all four
(bench/results/ab_session15_da_stores_h100.txt): 0.716 / 0.817 / 0.859 / 0.914 of the base.
The edits are textual, on the current kernel; an anchor that no longer matches stops the
script with its name.
"""
import sys

from overlays import write_overlays

SRC = "csrc/cuda/sm90_rowgemm.cu"

# (name, anchor, replacement): the anchor must occur exactly once in the source.
EDITS = [
    ("knob",
     "constexpr bool kHRing = MOE_SM90_DA_H_RING != 0;",
     "constexpr bool kHRing = MOE_SM90_DA_H_RING != 0;\n"
     "// dev/sm90/da_diag_overlays.py: timing-only build, WRONG outputs\n"
     "#define MOE_SM90_DIAG_DA @LEVEL@"),
    ("sub-chunk loop (level 1 skips the math)",
     "for (int sc = 0; sc < NSC; ++sc) {\n            auto hoff",
     "for (int sc = 0; sc < (MOE_SM90_DIAG_DA == 1 ? 0 : NSC); ++sc) {\n            auto hoff"),
    ("s*a store (levels 1, 2, 4 skip it)",
     "if (SA) *reinterpret_cast<uint32_t *>(sar + j * 8) = pack2<T>(sa[0], sa[1]);",
     "if (SA && MOE_SM90_DIAG_DA != 1 && MOE_SM90_DIAG_DA != 2 && MOE_SM90_DIAG_DA != 4)\n"
     "                    *reinterpret_cast<uint32_t *>(sar + j * 8) = pack2<T>(sa[0], sa[1]);"),
    ("dh stores (levels 1, 2, 3 skip them)",
     "if (r < t.row1) {\n                  const int sw = kHC == 64 ? (lr & 7) : ((lr >> 1) & 3);",
     "if (r < t.row1 && MOE_SM90_DIAG_DA != 1 && MOE_SM90_DIAG_DA != 2 && MOE_SM90_DIAG_DA != 3) {\n"
     "                  const int sw = kHC == 64 ? (lr & 7) : ((lr >> 1) & 3);"),
]


def main() -> int:
    variants = {f"da{level}": {"LEVEL": level} for level in (1, 2, 3, 4)}
    return write_overlays(SRC, EDITS, variants)


if __name__ == "__main__":
    sys.exit(main())
