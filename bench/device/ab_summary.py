"""Summary of an ab.sh run: per shape, T and kernel, each variant's time against base's.

    python3 bench/device/ab_summary.py OUT_DIR base VARIANT... [--ref LABEL] [--rounds [--min-ms MS]]

Reads OUT_DIR/ab_<name>.log (profile_kernels.py's output, one block per shape and T a round, rounds
appended in order). The first round warms the GPU and is left out when there are more. The
GPU's clock moves between rounds (all kernels, unchanged ones too, by up to 7% on the H100 in
session 8), so beside the plain ratio of medians it prints the ratio of each kernel's time to
a reference kernel's in the same round (--ref, default GEMM1/sm90), variant over base:
the change a knob makes to kernels it does not touch should read as 1.00 there.
--rounds adds each variant's time of every round read for the kernels over --min-ms (and
fwd+bwd): a median hides whether the rounds agree (session 17, 30B-A3B T=16384, six rounds:
two builds of the same code 0.4% apart in median; one variant's GEMM1 rounds 6% apart).
"""
import argparse
import collections
import pathlib
import re
import statistics
import sys

HEAD = re.compile(r"^== (\S+) T=(\d+): .*fwd\+bwd ([0-9.]+) ms")
# profile_kernels.py: "  {ms:8.3f} ms {share:5.1f}%  x{count}  {label:16s} {name[:110]}"
KERNEL = re.compile(r"^\s+([0-9.]+) ms\s+[0-9.]+%\s+x(\d+)  (.{16}) (.*)$")
SHORT = re.compile(r"(\w+)\s*[<(]")  # a kernel's function name: the first identifier before < or (


def short_name(name):
    m = SHORT.search(name.split("::")[-1] if "<" not in name else name[: name.index("<") + 1].split("::")[-1])
    return m.group(1) if m else name[:30]


def parse(path):
    """{(shape, T): [round -> {kernel key: ms}]}, plus the fwd+bwd wall time under 'fwd+bwd'."""
    rounds = collections.defaultdict(list)
    cur = None
    for line in pathlib.Path(path).read_text().splitlines():
        m = HEAD.match(line)
        if m:
            cur = {"fwd+bwd": float(m.group(3))}
            rounds[(m.group(1), int(m.group(2)))].append(cur)
            continue
        m = KERNEL.match(line)
        if m and cur is not None:
            label, name = m.group(3).strip(), m.group(4)
            key = label or short_name(name)
            while key in cur:  # dW2 and dW1 share a label: the second launch gets a prime
                key += "'"
            cur[key] = float(m.group(1))
    return rounds


def read_rounds(rounds):
    """The rounds to read: all but the first (the GPU's warm-up) when there are more."""
    return rounds[1:] if len(rounds) > 1 else rounds


def summarize(out_dir, names, ref):
    runs = {n: parse(pathlib.Path(out_dir) / f"ab_{n}.log") for n in names}
    base = runs[names[0]]
    lines = []
    for case in sorted(base):
        b_rounds = read_rounds(base[case])
        keys = [k for k in b_rounds[-1] if all(k in r for r in b_rounds)]
        lines.append(f"{case[0]} T={case[1]}  ({len(b_rounds)} round(s) read; ratios variant / {names[0]}; "
                     f"'vs {ref}': each time over {ref}'s in its round)")
        hdr = f"  {'kernel':34s} {names[0]:>9s}"
        for n in names[1:]:
            hdr += f" {n:>9s} {'ratio':>6s} {'vs ' + ref[:5]:>9s}"
        lines.append(hdr)
        for key in keys:
            b = statistics.median(r[key] for r in b_rounds)
            row = f"  {key[:34]:34s} {b:9.3f}"
            for n in names[1:]:
                v_rounds = read_rounds(runs[n].get(case, []))
                vals = [r[key] for r in v_rounds if key in r]
                if not vals:
                    row += f" {'-':>9s} {'-':>6s} {'-':>9s}"
                    continue
                v = statistics.median(vals)
                norm = "-"
                if key != "fwd+bwd" and all(ref in r for r in v_rounds + b_rounds):
                    rv = statistics.median(r[key] / r[ref] for r in v_rounds if key in r)
                    rb = statistics.median(r[key] / r[ref] for r in b_rounds)
                    norm = f"{rv / rb:.3f}"
                row += f" {v:9.3f} {v / b:6.3f} {norm:>9s}"
            lines.append(row)
    return "\n".join(lines)


def rounds_table(out_dir, names, min_ms=0.05):
    """Per shape and T, each kernel's time in every round read (the first left out when
    there are more), one line a kernel and variant: what a median hides."""
    runs = {n: parse(pathlib.Path(out_dir) / f"ab_{n}.log") for n in names}
    lines = []
    for case in sorted(runs[names[0]]):
        b_rounds = read_rounds(runs[names[0]][case])
        keys = [k for k in b_rounds[-1] if k == "fwd+bwd" or b_rounds[-1][k] >= min_ms]
        lines.append(f"{case[0]} T={case[1]}: every round read, ms")
        for key in keys:
            for n in names:
                rs = read_rounds(runs[n].get(case, []))
                vals = " ".join(f"{r[key]:.3f}" for r in rs if key in r)
                lines.append(f"  {key[:34]:34s} {n:>9s}  {vals}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("names", nargs="+", help="base first, then the variants")
    p.add_argument("--ref", default="GEMM1/sm90", help="kernel label the per-round ratios divide by")
    p.add_argument("--rounds", action="store_true", help="also every round's time (see above)")
    p.add_argument("--min-ms", type=float, default=0.05, help="--rounds: kernels at least this long")
    a = p.parse_args(argv)
    print(summarize(a.out_dir, a.names, a.ref))
    if a.rounds:
        print()
        print(rounds_table(a.out_dir, a.names, a.min_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
