"""Time the fusion pipeline on SmolLM2 (or --model PATH): graph build, then run_passes.

    python bench/passes/bench_passes.py [--model PATH] [--dtype float16] [--repeat 5]

Weights stay lazy throughout (nothing is dequantised or read), so this measures the rewrites
alone; the per-stage table is the median run's report.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import onnx
    import onnxruntime

    from llmc.build import default_model
    from llmc.model_zoo import load_model
    from llmc.passes import run_passes

    path = args.model or default_model()
    m = load_model(path)
    t0 = time.perf_counter()
    model, weights = m.build_graph(args.dtype, 16)
    graph_s = time.perf_counter() - t0
    runs = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        _, new_weights, report = run_passes(model, weights)
        runs.append((time.perf_counter() - t0, report, len(new_weights)))
    runs.sort(key=lambda r: r[0])
    seconds, report, n_weights = runs[len(runs) // 2]
    print(f"model: {path.name} ({m.config.num_hidden_layers} layers), dtype {args.dtype}")
    print(f"machine: {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}, onnx {onnx.__version__}, onnxruntime "
          f"{onnxruntime.__version__}")
    print(f"build_graph: {graph_s:.3f} s; run_passes: median {seconds:.3f} s, min "
          f"{runs[0][0]:.3f} s, max {runs[-1][0]:.3f} s over {args.repeat} runs "
          f"(mean {statistics.mean(r[0] for r in runs):.3f} s)")
    print(f"nodes {report['nodes_before']} -> {report['nodes_after']}, weights "
          f"{len(weights)} -> {n_weights}")
    print("\n| pass | fired | seconds |\n|---|---:|---:|")
    for s in report["stages"]:
        print(f"| {s['name']} | {s['fired']} | {s.get('seconds', 0):.3f} |")


if __name__ == "__main__":
    main()
