"""Textual overlays of one library source for bench/device/ab.sh (shared by the timing-only
diagnostic scripts here): each edit's anchor must occur exactly once in the source, and each
variant's copy goes to dev/ab/<variant>/<the source's path>."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def write_overlays(src: str, edits: list, variants: dict) -> int:
    """edits: (name, anchor, replacement) with @KEY@ placeholders; variants: {variant name:
    {KEY: value}}. Returns a process exit status (1: an anchor does not match once)."""
    path = ROOT / src
    text = path.read_text()
    for name, anchor, _ in edits:
        if text.count(anchor) != 1:
            print(f"anchor '{name}' found {text.count(anchor)} times in {path} (want 1): update the script",
                  file=sys.stderr)
            return 1
    for variant, values in variants.items():
        out = text
        for _, anchor, repl in edits:
            for key, value in values.items():
                repl = repl.replace(f"@{key}@", str(value))
            out = out.replace(anchor, repl, 1)
        dst = ROOT / "dev/ab" / variant / src
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(out)
        print(dst)
    return 0
