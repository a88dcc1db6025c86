"""Where one warp-specialised kernel's warps spend their time, from ncu_source.sh's CSV.

ncu_source.sh writes per-SASS-instruction stall samples of one launch ($OUT/NAME_sass.csv).
This reads that file (plain or .gz) on any machine and splits the samples the way the sm90
kernels are built:
- roles: the consumers' code starts at `USETMAXREG.TRY_ALLOC` (registers raised), the
  producer's at `USETMAXREG.DEALLOC`; what comes before either is the prologue;
- barrier waits: samples on an mbarrier try-wait (`SYNCS.PHASECHK`), the branch that
  retries it and the short loop back to it: the consumers waiting for full stages, the
  producer for free ones;
- the consumers' mainloop: the contiguous instructions around the first HGMMA executed at
  least as often as it (its k-steps); the rest of the consumers' code is tile setup and the
  epilogue;
then prints each part's share of the samples, its leading stall reasons and the top
instructions. Usage: python bench/device/stall_regions.py g1_sass.csv[.gz] [--top 25]
"""

import argparse
import csv
import gzip
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def read(path):
    """[(address, sass, samples, executed, {stall reason: samples})] in address order."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    # ncu's source page: a "Kernel Name" line, then the header, then one row an instruction
    start = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if start is None:
        sys.exit(f"{path}: no 'Address' header row: not ncu's --page source --csv output")
    hdr = rows[start]
    col = {h: i for i, h in enumerate(hdr)}
    for need in ("Address", "Source", SAMPLES, EXECUTED):
        if need not in col:
            sys.exit(f"{path}: column {need!r} missing (was the report taken with "
                     "--section WarpStateStats --section SourceCounters?)")
    reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]

    def num(r, name):
        v = r[col[name]].strip()
        return int(v) if v.isdigit() else 0

    out = []
    for r in rows[start + 1:]:
        if len(r) < len(hdr) or not r[0].startswith("0x"):
            continue
        out.append((int(r[0], 16), r[col["Source"]].strip(), num(r, SAMPLES), num(r, EXECUTED),
                    {k[len("stall_"):]: num(r, k) for k in reasons}))
    out.sort(key=lambda x: x[0])
    return out


def opcode(sass):
    parts = [p for p in sass.split() if not p.startswith("@")]
    return parts[0] if parts else ""


def branch_target(sass):
    """The absolute address a BRA jumps to, or None (ncu prints it as 0x...)."""
    for p in sass.replace(",", " ").split()[1:]:
        if p.startswith("0x"):
            try:
                return int(p, 16)
            except ValueError:
                return None
    return None


def regions(ins):
    """{name: [instruction indices]}: prologue, consumer and producer parts, the waits."""
    n = len(ins)
    first = lambda pred: next((i for i in range(n) if pred(ins[i][1])), None)
    cons = first(lambda s: "USETMAXREG.TRY_ALLOC" in s)
    prod = first(lambda s: "USETMAXREG.DEALLOC" in s)
    starts = sorted(i for i in (cons, prod) if i is not None)
    role = ["prologue"] * n
    for s in starts:
        name = "consumers" if s == cons else "producer"
        end = next((t for t in starts if t > s), n)
        for i in range(s, end):
            role[i] = name
    # barrier waits: the try-wait, the branch after it, and when that branch loops back a few
    # instructions to retry (the consumers' inlined spin), the loop between them
    wait = [False] * n
    for i, x in enumerate(ins):
        if opcode(x[1]).startswith("SYNCS.PHASECHK"):
            wait[i] = True
            if i + 1 < n and opcode(ins[i + 1][1]) == "BRA":
                wait[i + 1] = True
                target = branch_target(ins[i + 1][1])
                if target is not None and ins[i + 1][0] - 0x100 <= target < ins[i + 1][0]:
                    for j in range(i + 1, -1, -1):
                        if ins[j][0] < target:
                            break
                        wait[j] = True
    # the consumers' mainloop: around the first HGMMA, executed at least as often as it
    main = [False] * n
    h = next((i for i in range(n) if role[i] == "consumers" and opcode(ins[i][1]).startswith("HGMMA")), None)
    if h is not None:
        k = ins[h][3]
        lo = h
        while lo > 0 and role[lo - 1] == "consumers" and ins[lo - 1][3] >= k:
            lo -= 1
        hi = h
        while hi + 1 < n and role[hi + 1] == "consumers" and ins[hi + 1][3] >= k:
            hi += 1
        for i in range(lo, hi + 1):
            main[i] = True
    parts = {}
    for i in range(n):
        r = role[i]
        if r == "consumers":
            sub = ("consumers: full-stage waits" if wait[i] and main[i] else
                   "consumers: mainloop, rest" if main[i] else "consumers: tile setup + epilogue")
        elif r == "producer":
            sub = "producer: free-stage waits" if wait[i] else "producer: rest"
        else:
            sub = "prologue"
        parts.setdefault(r, []).append(i)
        if sub != r:
            parts.setdefault(sub, []).append(i)
    return parts


def mix(ins, idx, n=3):
    agg = {}
    for i in idx:
        for k, v in ins[i][4].items():
            agg[k] = agg.get(k, 0) + v
    t = sum(agg.values()) or 1
    return ", ".join(f"{k} {100 * v / t:.0f}%" for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:n] if v)


def report(ins, top):
    total = sum(x[2] for x in ins)
    if total == 0:
        sys.exit("no stall samples in the file")
    parts = regions(ins)
    base = ins[0][0]
    print(f"{total} samples over {len(ins)} instructions")
    order = ["prologue", "consumers", "consumers: mainloop, rest", "consumers: full-stage waits",
             "consumers: tile setup + epilogue", "producer", "producer: rest", "producer: free-stage waits"]
    for name in order:
        if name not in parts:
            continue
        s = sum(ins[i][2] for i in parts[name])
        role = name.split(":")[0]
        within = sum(ins[i][2] for i in parts.get(role, [])) or 1
        share = f"  ({100 * s / within:4.1f}% of the {role}')" if ":" in name else ""
        print(f"  {name:34s} {s:8d} {100 * s / total:5.1f}%{share}   {mix(ins, parts[name])}")
    print(f"top {top} instructions (offset from the kernel's start, samples, executions, stalls):")
    for a, sass, s, e, st in sorted(ins, key=lambda x: -x[2])[:top]:
        reasons = " ".join(f"{k}:{v}" for k, v in sorted(st.items(), key=lambda kv: -kv[1])[:2] if v)
        print(f"  {a - base:6x} {s:7d} {100 * s / total:5.1f}% {e:>10d}  {sass[:60]:60s} {reasons}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="ncu_source.sh's NAME_sass.csv (or .csv.gz)")
    ap.add_argument("--top", type=int, default=25, help="instructions to list (default 25)")
    a = ap.parse_args(argv)
    report(read(a.csv), a.top)


if __name__ == "__main__":
    main()
