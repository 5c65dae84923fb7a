"""What plain streaming kernels reach with the memory-bound kernels' access patterns: the
ceiling their bandwidth targets are judged against.

    python3 bench/kernels/stream_ceiling.py [--out ceiling.md]

- read+write patterns (R input streams read, W written, 16-byte accesses, a grid-stride loop
  with U vectors in flight a thread, swept over U and block sizes): copy (R1 W1), fused
  residual + RMSNorm (R2 W2: x and the residual in, the normed row and the new residual
  out) and SwiGLU (R2 W1), at the sizes bench.py times;
- the decode step's K/V reads: the pool and shuffled block tables of bench.py's decode row
  (B=64, context 2048, 8 kv heads x 128, bf16), one CTA per (sequence, kv head) reading its
  blocks' K and V with 16-byte loads, U blocks in flight; next to llmc's decode kernel on the
  same batch, and the decode kernel's load structure alone (its cp.async stages, CTAs an SM
  and warps' own rows, no math).
Each kernel is captured in a CUDA graph and replayed (bench.py's `bench`); bytes / time
against 3.35 TB/s (H100 SXM datasheet).
"""
from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch
from cuda.bindings import driver, nvrtc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DATASHEET_BW, bench, make_batch  # noqa: E402
from llmc.plugins.launch import Kernels  # noqa: E402

RW = r"""
extern "C" __global__ void rw(const uint4* __restrict__ a, const uint4* __restrict__ b,
                              uint4* __restrict__ c, uint4* __restrict__ d, long n) {
  const long stride = (long)gridDim.x * blockDim.x * U;
  for (long i0 = (long)blockIdx.x * blockDim.x * U + threadIdx.x; i0 < n; i0 += stride) {
    uint4 x[U], y[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long i = i0 + (long)u * blockDim.x;
      if (i < n) { x[u] = __ldcs(a + i); if (R > 1) y[u] = __ldcs(b + i); }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long i = i0 + (long)u * blockDim.x;
      if (i < n) {
        uint4 o = x[u];
        if (R > 1) { o.x ^= y[u].x; o.y ^= y[u].y; o.z ^= y[u].z; o.w ^= y[u].w; }
        __stcs(c + i, o);
        if (W > 1) __stcs(d + i, x[u]);
      }
    }
  }
}
"""

# A CTA per (sequence, kv head): each thread one 16-byte piece of every block's K and V.
KV = r"""
extern "C" __global__ void kv(const uint4* __restrict__ pool, const int* __restrict__ bt,
                              int mb, int nblk, int hkv, int nb, float* out) {
  const int b = blockIdx.x, h = blockIdx.y;
  const int per = blockDim.x;   // 16-byte pieces in one block of one head
  unsigned acc = 0;
  for (int i0 = 0; i0 < nblk; i0 += U) {
    uint4 v[U][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int blk = bt[b * mb + min(i0 + u, nblk - 1)];
#pragma unroll
      for (int w = 0; w < 2; ++w)
        v[u][w] = __ldcs(pool + ((size_t)(w * nb + blk) * hkv + h) * per + threadIdx.x);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u][0].x ^ v[u][0].w ^ v[u][1].y ^ v[u][1].z;
  }
  if (acc == 0x12345678u) out[0] = 1.f;   // keeps the loads
}
"""

# The decode kernel's load structure without its math: a CTA of 4 warps per (sequence, kv
# head), 100 KB of shared memory (2 CTAs an SM, as the decode kernel), each warp copying its
# own 16 rows of every 64-key tile (one bs=16 block) into NST cp.async stages and waiting on
# its own copies.
STAGED = r"""
__device__ __forceinline__ void cp16(unsigned dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
extern "C" __global__ void __launch_bounds__(128) staged(const char* __restrict__ pool,
    const int* __restrict__ bt, int mb, int nblk, int hkv, int nb, float* out) {
  extern __shared__ __align__(16) char sm[];
  const int b = blockIdx.x / hkv, h = blockIdx.x % hkv, n = nblk / 4;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned base = (unsigned)__cvta_generic_to_shared(sm);
  auto load = [&](int st, int j) {
    const int blk = bt[b * mb + j * 4 + warp];
    for (int w = 0; w < 2; ++w)
#pragma unroll
      for (int i = 0; i < 8; ++i)
        cp16(base + st * 32768 + w * 16384 + warp * 4096 + (i * 32 + lane) * 16,
             pool + ((((size_t)w * nb + blk) * hkv + h) << 12) + (i * 32 + lane) * 16);
  };
  for (int st = 0; st < NST; ++st) {
    if (st < n) load(st, st);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  unsigned acc = 0;
  for (int j = 0; j < n; ++j) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(NST - 1));
    __syncwarp();
    acc ^= *(const unsigned*)(sm + (j % NST) * 32768 + warp * 4096 + lane * 4);
    __syncwarp();
    if (j + NST < n) load(j % NST, j + NST);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  if (acc == 0x12345678u) out[0] = 1.f;
}
"""


def function(src: str, name: str, **defines):
    src = "".join(f"#define {k} {v}\n" for k, v in defines.items()) + src
    prog = nvrtc.nvrtcCreateProgram(src.encode(), b"s.cu", 0, [], [])[1]
    major, minor = torch.cuda.get_device_capability()
    opts = [f"--gpu-architecture=sm_{major}{minor}".encode(), b"-std=c++17"]
    if nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0] != 0:
        raise RuntimeError(f"{name}: compile failed")
    n = nvrtc.nvrtcGetCUBINSize(prog)[1]
    buf = b" " * n
    nvrtc.nvrtcGetCUBIN(prog, buf)
    return driver.cuModuleGetFunction(driver.cuModuleLoadData(buf)[1], name.encode())[1]


def launch(f, grid, block, args, types, smem=0):
    driver.cuLaunchKernel(f, *grid, 1, block, 1, 1, smem,
                          torch.cuda.current_stream().cuda_stream, (tuple(args), tuple(types)), 0)


def rw_rows(sms: int) -> list[str]:
    rows = []
    P, L = ctypes.c_void_p, ctypes.c_long
    for name, r, w, elems in (("copy (R1 W1) bf16 [8192,4096]", 1, 1, 8192 * 4096),
                              ("add+RMSNorm pattern (R2 W2) bf16 [8192,4096]", 2, 2,
                               8192 * 4096),
                              ("SwiGLU pattern (R2 W1) bf16 [4096,14336] out", 2, 1,
                               4096 * 14336)):
        n = elems * 2 // 16
        bufs = [torch.empty(n * 16, dtype=torch.uint8, device="cuda") for _ in range(4)]
        args = [b.data_ptr() for b in bufs] + [n]
        best = None
        for u in (1, 2, 4):
            f = function(RW, "rw", R=r, W=w, U=u)
            for threads, per_sm in ((256, 8), (512, 4), (1024, 2)):
                t = bench(lambda f=f, th=threads, ps=per_sm: launch(
                    f, (sms * ps, 1), th, args, (P, P, P, P, L)))
                best = min(best or (t, u, threads), (t, u, threads))
        t, u, threads = best
        gbs = (r + w) * n * 16 / t
        rows.append(f"| {name} | {t * 1e6:.1f} | {gbs / 1e9:.0f} | "
                    f"{100 * gbs / DATASHEET_BW:.1f}% | U={u}, {threads} threads |")
    return rows


def kv_rows() -> list[str]:
    rows = []
    K = Kernels()
    P, INT = ctypes.c_void_p, ctypes.c_int
    out = torch.zeros(1, device="cuda")
    for bs in (16, 64):
        q, k, v, st, cl, tb, cache = make_batch([1] * 64, [2048] * 64, 32, 8, 128, bs,
                                                torch.bfloat16, extra_blocks=0)
        nbytes = 64 * 2048 * 2 * 8 * 128 * 2
        t = bench(lambda: K.paged_attention(q, k, v, st, cl, tb, cache, write_kv=False))
        rows.append(f"| llmc decode kernel, B=64 ctx=2048 bs={bs} | {t * 1e6:.1f} | "
                    f"{nbytes / t / 1e9:.0f} | {100 * nbytes / t / DATASHEET_BW:.1f}% | |")
        args = [cache.data_ptr(), tb.data_ptr(), tb.shape[1], 2048 // bs, 8, cache.shape[1],
                out.data_ptr()]
        best = None
        for u in (2, 4, 8):
            f = function(KV, "kv", U=u)
            t = bench(lambda f=f: launch(f, (64, 8), bs * 16, args, (P, P, INT, INT, INT, INT, P)))
            best = min(best or (t, u), (t, u))
        t, u = best
        rows.append(f"| plain read of the same K/V, bs={bs} | {t * 1e6:.1f} | "
                    f"{nbytes / t / 1e9:.0f} | {100 * nbytes / t / DATASHEET_BW:.1f}% | "
                    f"U={u}, {bs * 16} threads |")
        if bs == 16:
            f = function(STAGED, "staged", NST=3)
            smem = 100 << 10
            driver.cuFuncSetAttribute(
                f, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem)
            t = bench(lambda: launch(f, (64 * 8, 1), 128, args, (P, P, INT, INT, INT, INT, P),
                                     smem))
            rows.append(f"| the decode kernel's loads alone (3 cp.async stages, 2 CTAs an SM, "
                        f"a warp's own rows), bs=16 | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | "
                        f"{100 * nbytes / t / DATASHEET_BW:.1f}% | 4 warps |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args()
    dev = torch.cuda.get_device_properties(0)
    lines = [f"GPU: {dev.name}, {dev.multi_processor_count} SMs; torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}", "",
             "| pattern | us | GB/s | % of 3.35 TB/s | best configuration |",
             "|---|---:|---:|---:|---|"]
    lines += rw_rows(dev.multi_processor_count) + kv_rows()
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
