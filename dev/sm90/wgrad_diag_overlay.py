#!/usr/bin/env python3
"""A timing-only build of the sm90a weight-gradient kernel (sm90_wgrad.cu) whose epilogue
stores nothing, as a bench/device/ab.sh overlay: dev/ab/wgnoepi/csrc/cuda/sm90_wgrad.cu.

    python3 dev/sm90/wgrad_diag_overlay.py
    AB_SHAPES="30b-a3b:4096,16384" AB_ROUNDS=3 bash bench/device/ab.sh wgnoepi=+dev/ab/wgnoepi
    # carry ["dev/ab"]; never AB_TESTS: dW1 and dW2 are WRONG in this build

The consumers still wait for their last wgmma of each tile; the accumulators stay live
through an impossible store. Session 15 measured it (bench/results/
ab_session15_wgrad_noepi_rel0_h100.txt): dW1 1.38 -> 1.21 ms, dW2 0.70 -> 0.63 at 30B-A3B
T=16384. The edit is textual, on the current kernel; an anchor that no longer matches stops
the script.
"""
import sys

from overlays import write_overlays

SRC = "csrc/cuda/sm90_wgrad.cu"
ANCHOR = "      if (pend_e >= 0) flush();  // KB <= kFlushKb"
CUT = ("      // dev/sm90/wgrad_diag_overlay.py: timing-only build, WRONG outputs\n"
       "      if (acc[0] == 1234.5f && acc[BN / 2 - 1] == -1.f) C[tid_wg] = T(acc[1]);\n"
       "      continue;\n")
# (name, anchor, replacement), as overlays.write_overlays takes them
EDITS = [("the epilogue's start", ANCHOR, CUT + ANCHOR)]


def main() -> int:
    return write_overlays(SRC, EDITS, {"wgnoepi": {}})


if __name__ == "__main__":
    sys.exit(main())
