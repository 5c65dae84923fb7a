"""Where a decode step of the cuda backend spends its time, kernel by kernel (Nsight Compute).

    python3 bench/profile_step.py --layers 2 --batches 1 64 --context 512 --work /tmp/prof
    python3 bench/profile_step.py --model qwen3-30b-a3b --quant fp8-block --batches 1 8

Builds a Llama-3.1-8B- (or Qwen3-30B-A3B-) shaped engine with fewer layers (the same shapes,
so a layer's kernels are the full model's; random bf16 weights made on the GPU, see
bench/e2e.py; --quant as e2e.py's), times its
CUDA-graphed decode step with events, then runs one step of each batch size under `ncu`
(`--graph-profiling node`, caches flushed before every kernel, clocks left alone) for each
kernel's duration and DRAM bytes. Per batch it prints:

- every kernel of the step in launch order, with its time, DRAM bytes and bandwidth as a %
  of the GPU's datasheet bandwidth (e2e.hbm_bytes_per_s);
- the layer's kernels summed against the graphed step: the difference is what launching costs
  between kernels (gaps, ramp-up and tail that the isolated kernel times do not include,
  less what programmatic dependent launch overlaps).

ncu replays kernels one at a time with cold caches, so its times are each kernel alone; the
graphed step is the real sequence.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from e2e import (  # noqa: E402
    CONFIGS,
    build_engine,
    check_events,
    hbm_bytes_per_s,
    make_model,
    source_digest,
    token_id,
)

METRICS = "gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum"


def decode_inputs(session, batch: int, context: int):
    from llmc import contract

    bs = session.io.block_size
    per_seq = -(-(context + 2) // bs)
    blocks = np.arange(batch * per_seq, dtype=np.int32).reshape(batch, per_seq)
    return contract.pack_step([contract.Chunk([token_id(b, 0)], context, blocks[b])
                               for b in range(batch)], bs)


def step(session, inputs, batch: int):
    session.step_sample(inputs, 0.0, 0, 1.0, np.arange(batch), 0)


def time_steps(session, batch: int, context: int, n: int = 30) -> float:
    """Median GPU time of the graphed decode step, ms."""
    from cuda.bindings import driver

    inputs = decode_inputs(session, batch, context)
    ev0, ev1 = check_events()
    times = []
    for k in range(n + 3):
        driver.cuEventRecord(ev0, session.stream)
        step(session, inputs, batch)
        driver.cuEventRecord(ev1, session.stream)
        driver.cuEventSynchronize(ev1)
        if k >= 3:
            times.append(driver.cuEventElapsedTime(ev0, ev1)[1])
    return statistics.median(times)


def profiled(engine: Path, batch: int, context: int) -> None:
    """Under ncu: warm the bucket's graph, then one step inside the profiler's range."""
    from cuda.bindings import runtime

    from llmc.backends.cuda.session import CudaSession
    from llmc.engine_file import EngineFile

    session = CudaSession(EngineFile(engine), gpu_memory_utilization=0.5)
    inputs = decode_inputs(session, batch, context)
    for _ in range(3):
        step(session, inputs, batch)
    runtime.cudaProfilerStart()
    step(session, inputs, batch)
    runtime.cudaProfilerStop()
    session.close()


def ncu_kernels(engine: Path, batch: int, context: int) -> list[dict]:
    cmd = ["ncu", "--profile-from-start", "off", "--clock-control", "none",
           "--graph-profiling", "node", "--metrics", METRICS, "--csv", "--print-units", "base",
           "--print-kernel-base", "function", sys.executable, __file__, "--inner",
           str(engine), "--batches", str(batch), "--context", str(context)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith('"')]
    if not rows:
        sys.exit(f"ncu gave no rows:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    kernels: dict[str, dict] = {}
    for r in csv.DictReader(io.StringIO("\n".join(rows))):
        k = kernels.setdefault(r["ID"], {"name": r["Kernel Name"], "grid": r["Grid Size"],
                                         "block": r["Block Size"]})
        k[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
    return [kernels[i] for i in sorted(kernels, key=int)]


def report(kernels: list[dict], step_ms: float, batch: int, context: int, hbm: float) -> str:
    total = sum(k["gpu__time_duration.sum"] for k in kernels) / 1e3
    step_us = step_ms * 1e3
    lines = [f"### batch {batch}, context {context}: {len(kernels)} kernels a step", "",
             f"graphed step {step_us:.0f} us (GPU, median); the kernels alone {total:.0f} us; "
             f"the difference, launching and gaps: {step_us - total:.0f} us", "",
             f"| # | kernel | grid | us | DRAM MB | % of {hbm / 1e12:.2f} TB/s |",
             "|---|---|---|---|---|---|"]
    for i, k in enumerate(kernels):
        t = k["gpu__time_duration.sum"] / 1e3
        mb = (k["dram__bytes_read.sum"] + k["dram__bytes_write.sum"]) / 1e6
        lines.append(f"| {i} | {k['name'][:64]} | {k['grid']} | {t:.1f} | {mb:.2f} | "
                     f"{100 * mb * 1e6 / (t * 1e-6) / hbm:.0f}% |")
    return "\n".join(lines + [""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(CONFIGS), default="llama-3.1-8b")
    ap.add_argument("--quant", default="none", help="as bench/e2e.py's (none, fp8-block, ...)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmc-profile"))
    ap.add_argument("--out", type=Path, default=None, help="append the tables here")
    ap.add_argument("--inner", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        return profiled(args.inner, args.batches[0], args.context)

    import torch

    from llmc.backends.cuda.session import CudaSession
    from llmc.engine_file import EngineFile
    from llmc.limits import BuildLimits

    args.work.mkdir(parents=True, exist_ok=True)
    src = make_model(args.model, args.work / f"{args.model}-{args.layers}l", args.layers)
    limits = BuildLimits(max_batch_size=max(args.batches), max_num_tokens=2048,
                         max_seq_len=args.context + 64, kv_block_size=16)
    # e2e.source_digest: why
    name = f"{args.model}-{args.layers}l-{args.quant}-{source_digest()}.engine"
    engine = build_engine(src, args.work / name, limits, quant=args.quant)
    hbm = hbm_bytes_per_s(torch.cuda.get_device_name())
    session = CudaSession(EngineFile(engine), gpu_memory_utilization=0.5)
    steps = {b: time_steps(session, b, args.context) for b in args.batches}
    session.close()
    text = [f"command: python3 bench/profile_step.py --model {args.model} --quant {args.quant} "
            f"--layers {args.layers} --batches {' '.join(map(str, args.batches))} "
            f"--context {args.context}", ""]
    for b in args.batches:
        kernels = ncu_kernels(engine, b, args.context)
        text.append(report(kernels, steps[b], b, args.context, hbm))
        print(text[-1], flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
