"""bench/device/stall_regions.py: the split of a kernel's stall samples by role and wait."""

import gzip
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("stall_regions", ROOT / "bench/device/stall_regions.py")
stall_regions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stall_regions)

BASE = 0x7F0000000000
# (sass, samples, executions, long_sb samples): a consumer spin loop that branches back, a
# mainloop of two HGMMAs, an epilogue, then the producer with a forward-branching try-wait.
PROGRAM = [
    ("LDC R1, c[0x0][0x28]", 4, 10, 0),
    ("USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8", 1, 10, 0),
    ("MOV R2, RZ", 1, 100, 0),                                   # tile setup
    ("MOV R14, 0x400", 30, 5000, 0),                             # spin loop start
    ("SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R12+URZ], R13", 10, 5000, 0),
    ("@!P0  BRA 0x%x" % (BASE + 0x30), 200, 5000, 190),          # back to the MOV: the spin
    ("HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24", 50, 1000, 0),
    ("HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24, gsb0", 60, 1000, 0),
    ("WARPGROUP.DEPBAR.LE gsb0, 0x1", 40, 1000, 0),
    ("@!P0  BRA 0x%x" % (BASE + 0x30), 10, 1000, 0),             # next k-step
    ("F2F.BF16.F32 R91, R91", 70, 100, 0),                       # epilogue
    ("USETMAXREG.DEALLOC.CTAPOOL 0x28", 1, 10, 0),
    ("SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R30+UR15+0x20], R5", 5, 500, 0),
    ("@!P0  BRA 0x%x" % (BASE + 0x200), 95, 500, 90),            # to an out-of-line retry
    ("LDGSTS.E.BYPASS.128 [R34], desc[UR20][R6.64]", 100, 500, 0),
]


def _write(path, rows, gz=False):
    header = ["Address", "Source", stall_regions.SAMPLES, stall_regions.EXECUTED,
              "stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]
    lines = ['"Kernel Name","void k(Params)"', ",".join(f'"{h}"' for h in header)]
    for i, (sass, s, e, lsb) in enumerate(rows):
        vals = [f"0x{BASE + 0x10 * i:x}", f"      {sass}", s, e, lsb, s - lsb, lsb]
        lines.append(",".join(f'"{v}"' for v in vals))
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def _sums(ins):
    parts = stall_regions.regions(ins)
    return {k: sum(ins[i][2] for i in v) for k, v in parts.items()}


@pytest.mark.parametrize("gz", [False, True])
def test_roles_waits_and_mainloop(tmp_path, gz):
    path = tmp_path / ("k.csv.gz" if gz else "k.csv")
    _write(path, PROGRAM, gz=gz)
    ins = stall_regions.read(str(path))
    assert len(ins) == len(PROGRAM) and ins[0][3] == 10
    assert ins[5][4]["long_sb"] == 190  # the "(Not Issued)" column is not mixed in
    s = _sums(ins)
    assert s["prologue"] == 4
    assert s["consumers"] == 1 + 1 + 30 + 10 + 200 + 50 + 60 + 40 + 10 + 70
    # the whole back-branching spin, MOV included, is waiting; the k-step branch is not
    assert s["consumers: full-stage waits"] == 30 + 10 + 200
    assert s["consumers: mainloop, rest"] == 50 + 60 + 40 + 10
    assert s["consumers: tile setup + epilogue"] == 1 + 1 + 70
    assert s["producer: free-stage waits"] == 5 + 95
    assert s["producer: rest"] == 1 + 100


def test_report_prints_shares(tmp_path, capsys):
    path = tmp_path / "k.csv"
    _write(path, PROGRAM)
    stall_regions.main([str(path), "--top", "3"])
    out = capsys.readouterr().out
    assert "consumers: full-stage waits" in out and "producer: free-stage waits" in out
    assert out.count("BRA") == 2 and "LDGSTS" in out  # the top three: both waits, the loads


def test_not_an_ncu_file(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="no 'Address' header"):
        stall_regions.read(str(path))
