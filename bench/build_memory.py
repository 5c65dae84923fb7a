"""`llmc build` wall time and peak RSS, each build in a fresh process.

    python bench/build_memory.py [--model PATH] [--backend reference tensorrt-rtx cuda]
                                 [--dtype fp16] [--gpu-arch sm_90a] [--repeat N]

Peak RSS is the build process's own high-water mark (getrusage), set against the bytes of
the model's weights in fp16 (the target is under 2x those bytes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from llmc.build import BuildOptions, build, default_model
model = Path(sys.argv[1]) if sys.argv[1] else default_model()
t0 = time.perf_counter()
h = build(BuildOptions(model, Path(sys.argv[2]), backend=sys.argv[3], dtype=sys.argv[4],
                       gpu_arch=(sys.argv[5] or None) if sys.argv[3] == "cuda" else None),
          log=lambda _: None)
c = h.model.config
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "engine_bytes": Path(sys.argv[2]).stat().st_size, "config": c}))
"""


def fp16_weight_bytes(c: dict) -> int:
    h, i, v, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    head = 0 if c["tie_word_embeddings"] else v * h
    return 2 * (v * h + L * per_layer + h + head)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="")
    ap.add_argument("--backend", nargs="+", default=["reference", "tensorrt-rtx"])
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--gpu-arch", default="",
                    help="the cuda backend's target where the machine has no GPU (sm_90a)")
    ap.add_argument("--repeat", type=int, default=1, help="builds of each (a row each)")
    a = ap.parse_args()
    print("| backend | dtype | wall s | peak RSS MiB | fp16 weights MiB | RSS / weights |")
    print("|---|---|---|---|---|---|")
    for backend in [b for b in a.backend for _ in range(a.repeat)]:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, a.model, f"{tmp}/m.engine",
                                  backend, a.dtype, a.gpu_arch], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        w = fp16_weight_bytes(r["config"])
        print(f"| {backend} | {a.dtype} | {r['seconds']:.1f} | {r['peak_rss'] / 2**20:.0f} | "
              f"{w / 2**20:.0f} | {r['peak_rss'] / w:.2f} |")


if __name__ == "__main__":
    main()
