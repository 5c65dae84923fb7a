// Skinny GEMM for decode steps: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for m <= M
// rows of x (M = 1 or 2 as compiled below), with the weight stored [N, K] (a linear layer's [out, in], as HF keeps it).
//
// At decode the GEMM reads each weight once and does 2*M flops per weight: it is a stream over
// the weights, so the kernel is written for bandwidth, not for tensor cores:
// - one warp owns R weight rows; each lane reads 16 bytes of each row per step (a warp reads
//   512 contiguous bytes of a row), U steps unrolled, so R*U independent 16-byte loads are in
//   flight per lane before any arithmetic needs them;
// - the weights are loaded with ld.global.nc.L1::no_allocate: read once, they must not evict
//   x, which every warp re-reads from L1 (x is M*K*2 bytes, tiny);
// - each x value is converted once and reused for the R rows, which keeps the L1 traffic at
//   M/R times the weight traffic;
// - the R*M dot products end in one warp-shuffle reduction; no shared memory, no split-K (the
//   decode shapes have thousands of rows, enough warps to fill every SM);
// - launched with programmatic dependent launch (sm_90+), the first weight loads are issued
//   before pdl_wait(): they overlap the tail of the kernel before (a norm, the attention,
//   another GEMV), which the 10-20 us GEMVs of a decode step otherwise pay in full.
//
// ACT = 1 (SwiGLU) or 2 (GeGLU, tanh) fuses the gated activation of a gate-up GEMM: w is the
// fused [2I, K] weight, gate rows [0, I) and up rows [I, 2I); the warp's R rows are R/2 gate
// rows and the matching up rows, and it writes act(gate) * up [m, I] directly. Rounding
// follows the unfused path exactly (gate and up rounded to T as the GEMM would store them,
// act rounded as kernels/activation.cu does), so fused and unfused outputs are bit-identical.
//
// Arguments: (x [m, K] T, w [N, K] T, bias [N] in the output type or null, m, N, K, y [m, N]
// in T or fp32); for ACT != 0, N is I (the output width) and bias must be null. K % 8 == 0 and
// 16-byte-aligned x and w (launch_rules.gemv_launch checks what it can).
#include "common.cuh"

// The weight loads ask L2 for whole 128-byte lines (.L2::128B), as kernels/qgemv.cuh's do:
// tc_gemv's warp loads 64 bytes of each of 16 rows and the next warp the lines' other halves.
// On the H100 that reads 2-3 points more of HBM at 8 rows; at 1-2 rows a warp's load is 512
// contiguous bytes, whole lines already, and nothing changes (bench/kernels/l2_prefetch.py,
// bench/results/gemv.md). The SASS differs only by the loads' LTC128B qualifier. A benchmark
// may define GEMV_L2 itself to compare.
#ifndef GEMV_L2
#define GEMV_L2 ".L2::128B"
#endif
LLMC_LD_STREAM_L2(ld_weights, GEMV_L2)

template <typename T, int M, int R, int U, int ACT, bool F32>
__device__ __forceinline__ void gemv(const u16* __restrict__ x, const u16* __restrict__ w,
                                     const void* __restrict__ bias, int m, int n, int k,
                                     void* __restrict__ y) {
  constexpr int OUT = ACT ? R / 2 : R;  // outputs per warp
  static_assert(OUT * M <= 32, "one lane stores each of a warp's outputs");
  const int lane = threadIdx.x & 31;
  const int out0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * OUT;
  if (out0 >= n) {
    pdl_trigger();
    return;
  }
  const u16* row[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    // Rows past the end re-read the last row (their sums are never stored): no branch in
    // the loop below.
    const int o = min(out0 + r % OUT, n - 1);
    row[r] = w + (size_t)(ACT && r >= OUT ? n + o : o) * k;
  }
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < M; ++i) acc[r][i] = 0.f;

  // The weights do not depend on the previous kernel: the first U steps of them are loaded
  // before pdl_wait(), overlapping the previous kernel's tail (with PDL; see common.cuh).
  uint4 wv[U][R];
  auto load_w = [&](int k0) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
        wv[u][r] = k0 + u * 256 < k ? ld_weights(row[r] + k0 + u * 256) : make_uint4(0, 0, 0, 0);
  };
  load_w(lane * 8);
  pdl_trigger();
  pdl_wait();
  for (int k0 = lane * 8; k0 < k; k0 += 256 * U) {
    if (k0 != lane * 8) load_w(k0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kk = k0 + u * 256;
      float wf[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) unpack8<T>(wv[u][r], wf[r]);
#pragma unroll
      for (int i = 0; i < M; ++i) {
        float xf[8];
        const uint4 xv = i < m && kk < k ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)i * k + kk))
                                         : make_uint4(0, 0, 0, 0);
        unpack8<T>(xv, xf);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[r][i] = fmaf(wf[r][j], xf[j], acc[r][i]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < M; ++i) acc[r][i] = warp_sum(acc[r][i]);

  // Every lane holds every sum; lane p stores output p of the warp's OUT x M.
#pragma unroll
  for (int r = 0; r < OUT; ++r) {
#pragma unroll
    for (int i = 0; i < M; ++i) {
      const int o = out0 + r;
      if (lane != r * M + i || i >= m || o >= n) continue;
      float v = acc[r][i];
      if constexpr (ACT) {
        const float g = rnd<T>(v), up = rnd<T>(acc[r + OUT][i]);
        v = rnd<T>(ACT == 1 ? silu_f(g) : gelu_tanh_f(g)) * up;
      } else if (bias) {
        v += F32 ? reinterpret_cast<const float*>(bias)[o]
                 : T::to_f(reinterpret_cast<const u16*>(bias)[o]);
      }
      if constexpr (F32) reinterpret_cast<float*>(y)[(size_t)i * n + o] = v;
      else reinterpret_cast<u16*>(y)[(size_t)i * n + o] = T::from_f(v);
    }
  }
}

// ---- 3 to 16 rows: tensor cores -----------------------------------------------------------
// From 3 rows on, CUDA-core dot products convert each x value R times per weight row and
// run out of issue slots; mma.sync.m16n8k16 does 16 weight rows x 8 x rows a lane-step.
// A = 16 weight rows, B = 8 (NT = 1) or 16 (NT = 2) rows of x, fp32 C. The order of a dot
// product's K terms is free, so a lane's 16-byte load of 8 consecutive k of a weight row is
// its A fragment for two k16 steps as it stands, and the same 8 k of an x row its B fragment:
// lane (g = lane/4, t = lane%4) loads k [8t, 8t+8) of a 32-k chunk, whose k 8t+0,1 / 8t+2,3
// sit in the fragment slots of logical k 2t,2t+1 / 2t+8,2t+9 (step one; 8t+4..7 step two).
// No shared-memory staging, no ldmatrix: the weights stream from HBM to the tensor cores.
// A CTA is SK warps over the same 16 rows, warp i taking the 32-k chunks i, i + SK, ...:
// each row is read by the CTA as contiguous 64 * SK-byte runs; the SK partial tiles are
// summed through shared memory in warp order (deterministic). U chunks are loaded ahead.
// ACT: rows g and g + 8 of the tile are the gate and up rows of output o0 + g, so the
// activation's two inputs end in the same lane, rounded as the GEMV above rounds them.
template <typename T, int NT, int SK, int U, int ACT, bool F32>
__device__ __forceinline__ void tc_gemv(const u16* __restrict__ x, const u16* __restrict__ w,
                                        const void* __restrict__ bias, int m, int n, int k,
                                        void* __restrict__ y) {
  __shared__ float part[SK][NT][4][32];
  constexpr int OUT = ACT ? 8 : 16;  // outputs a CTA
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int o0 = blockIdx.x * OUT;
  // Rows past the end re-read the last row (never stored), as in the GEMV.
  const int ra = min(o0 + g, n - 1);
  const int rb = ACT ? n + ra : min(o0 + g + 8, n - 1);
  const u16* wa = w + (size_t)ra * k + 8 * t;
  const u16* wb = w + (size_t)rb * k + 8 * t;
  const int chunks = (k + 31) / 32;
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  // Two register stages: the next U chunks are in flight while the tensor cores take these.
  uint4 va[U], vb[U], na[U], nb[U];
  auto load_w = [&](uint4* a, uint4* b, int c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kk = (c + u * SK) * 32;
      const bool ok = kk + 8 * t < k;
      a[u] = ok ? ld_weights(wa + kk) : make_uint4(0, 0, 0, 0);
      b[u] = ok ? ld_weights(wb + kk) : make_uint4(0, 0, 0, 0);
    }
  };
  load_w(va, vb, warp);
  load_w(na, nb, warp + SK * U);
  pdl_trigger();
  pdl_wait();
  for (int c = warp; c < chunks; c += SK * U) {
    if (c != warp) {
#pragma unroll
      for (int u = 0; u < U; ++u) { va[u] = na[u]; vb[u] = nb[u]; }
      load_w(na, nb, c + SK * U);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kk = (c + u * SK) * 32 + 8 * t;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int xr = j * 8 + g;
        const uint4 xv = xr < m && kk < k
                             ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)xr * k + kk))
                             : make_uint4(0, 0, 0, 0);
        mma_16816<T>(acc[j], va[u].x, vb[u].x, va[u].y, vb[u].y, xv.x, xv.y);
        mma_16816<T>(acc[j], va[u].z, vb[u].z, va[u].w, vb[u].w, xv.z, xv.w);
      }
    }
  }
  tc_store<T, NT, SK, ACT, F32>(part, acc, o0, m, n, bias, y, 1.f, nullptr);
}

// Entry points gemv_<dtype>_<out>_m<M>[_swiglu|_geglu]; R and U per M as benchmarked on the
// H100 (bench/kernels/gemv.py): more rows a warp as M grows, so x is converted fewer times
// per weight.
#define GEMV_ENTRY(NAME, TY, M, R, U, ACT, F32)                                                \
  extern "C" __global__ void __launch_bounds__(128)                                            \
  NAME(const u16* x, const u16* w, const void* bias, int m, int n, int k, void* y) {           \
    gemv<TY, M, R, U, ACT, F32>(x, w, bias, m, n, k, y);                                       \
  }

// The fused gate needs a gate and an up row at least: R >= 2.
#define GEMV_M(DT, TY, M, R, U)                                                                \
  GEMV_ENTRY(gemv_##DT##_##DT##_m##M, TY, M, R, U, 0, false)                                    \
  GEMV_ENTRY(gemv_##DT##_f32_m##M, TY, M, R, U, 0, true)                                       \
  GEMV_ENTRY(gemv_##DT##_##DT##_m##M##_swiglu, TY, M, (R < 2 ? 2 : R), U, 1, false)             \
  GEMV_ENTRY(gemv_##DT##_##DT##_m##M##_geglu, TY, M, (R < 2 ? 2 : R), U, 2, false)

// B: CTAs an SM the registers must leave room for (__launch_bounds__'s minimum; 0: no floor).
#define TC_ENTRY(NAME, TY, NT, SK, U, B, ACT, F32)                                             \
  extern "C" __global__ void __launch_bounds__(32 * SK, B)                                     \
  NAME(const u16* x, const u16* w, const void* bias, int m, int n, int k, void* y) {           \
    tc_gemv<TY, NT, SK, U, ACT, F32>(x, w, bias, m, n, k, y);                                  \
  }
#define TC_M(DT, TY, M, NT, SK, U, B)                                                          \
  TC_ENTRY(gemv_##DT##_##DT##_m##M, TY, NT, SK, U, B, 0, false)                                 \
  TC_ENTRY(gemv_##DT##_f32_m##M, TY, NT, SK, U, B, 0, true)                                    \
  TC_ENTRY(gemv_##DT##_##DT##_m##M##_swiglu, TY, NT, SK, U, B, 1, false)                        \
  TC_ENTRY(gemv_##DT##_##DT##_m##M##_geglu, TY, NT, SK, U, B, 2, false)

#ifndef GEMV_VARIANTS  // benchmarks compile their own grid of (M, R, U)
// 1-2 rows: the CUDA-core GEMV; 3-8 rows: the tensor-core kernel; from 9 rows cuBLASLt reads
// the decode shapes as fast or faster (bench/results/gemv.md). Which tensor-core kernel
// follows the GEMM's tiles against the SMs (launch_rules.gemv_launch), as the FP8 GEMV's
// does: 16 warps over K, one chunk ahead, as many CTAs an SM as its registers allow (2) for
// up to 2 tiles an SM (o, down); _wide, 8 warps, two chunks ahead and 3 CTAs an SM, for up to
// 3 (qkv: 384 tiles run in one wave, not 1.45: 73 -> 82% of HBM on the H100); _w32, 32 warps
// a CTA, past that (gate-up: 86 -> 90%).
#define GEMV_DTYPE(DT, TY)                                                                     \
  GEMV_M(DT, TY, 1, GEMV_R1, GEMV_U1)                                                          \
  GEMV_M(DT, TY, 2, GEMV_R2, GEMV_U2)                                                          \
  TC_M(DT, TY, 8, 1, GEMV_TC_SK, GEMV_TC_U, 0)                                                 \
  TC_M(DT, TY, 8_wide, 1, 8, 2, 3)                                                             \
  TC_M(DT, TY, 8_w32, 1, 32, 1, 0)
#define GEMV_TC_SK 16
#define GEMV_TC_U 1
#define GEMV_R1 1
#define GEMV_U1 8
#define GEMV_R2 2
#define GEMV_U2 4
LLMC_F16(GEMV_DTYPE(f16, F16))
LLMC_BF16(GEMV_DTYPE(bf16, BF16))
#endif
