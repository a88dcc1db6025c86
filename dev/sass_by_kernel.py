"""Which kernels of a default build are instruction-identical to those of tested builds.

A knob build that passed the GPU tests and compute-sanitizer, and a default build that
should take some of its kernels: this says, kernel by kernel, which reference build each of
the new cubin's kernels equals (after normalising names, constant-bank offsets, encodings'
line comments, label and internal helper numbers), so flipping a default needs no new GPU run.

  nvcc -arch=sm_90a -cubin -I csrc -I csrc/include --expt-relaxed-constexpr -std=c++17 -O3 \
      [-D...] csrc/cuda/sm90_rowgemm.cu -o /tmp/base.cubin        (and the others)
  python3 dev/sass_by_kernel.py /tmp/new.cubin base=/tmp/base.cubin stm=/tmp/stm.cubin

NVDISASM (default: nvdisasm on PATH; the pip wheel nvidia-cuda-nvdisasm has one).
"""
import os
import re
import subprocess
import sys


def kernels(cubin):
    nvdisasm = os.environ.get("NVDISASM", "nvdisasm")
    text = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True,
                          check=True).stdout
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*\.text\.(\S+):", line)
        if m:
            cur = m.group(1)
            out[cur] = []
        elif cur:
            line = re.sub(r"_ZN[0-9A-Za-z_]+", "", line)
            line = re.sub(r"c\[0x[0-9a-f]+\]\[0x[0-9a-f]+\]", "c[]", line)
            line = re.sub(r"/\*[0-9a-f]{4}\*/", "", line)
            line = re.sub(r"\$__internal_\d+_", "$__internal_", line)  # numbered per file
            out[cur].append(re.sub(r" +", " ", line))
    for name, lines in out.items():  # labels are numbered across the file: renumber per kernel
        labels = {}
        out[name] = [re.sub(r"\.L_x_\d+", lambda m: ".L%d" % labels.setdefault(m.group(0), len(labels)),
                            line) for line in lines]
    return out


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    new = kernels(argv[1])
    refs = [(spec.split("=", 1)[0], kernels(spec.split("=", 1)[1])) for spec in argv[2:]]
    unmatched = 0
    for name in sorted(new):
        same = [label for label, ref in refs if ref.get(name) == new[name]]
        unmatched += not same
        pretty = subprocess.run(["c++filt"], input=name, capture_output=True, text=True).stdout
        print("%-12s %s" % (",".join(same) or "NONE", pretty.strip()[:140]))
    return 1 if unmatched else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
