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

__device__ __forceinline__ uint4 ld_stream(const u16* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// 8 packed 16-bit values -> fp32 (bf16 is the high half of an fp32: a shift or a mask).
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (T::is_bf16) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      f[2 * i] = T::to_f((u16)(w[i] & 0xffffu));
      f[2 * i + 1] = T::to_f((u16)(w[i] >> 16));
    }
  }
}

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
        wv[u][r] = k0 + u * 256 < k ? ld_stream(row[r] + k0 + u * 256) : make_uint4(0, 0, 0, 0);
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

#ifndef GEMV_VARIANTS  // benchmarks compile their own grid of (M, R, U)
// From 4 rows on, cuBLASLt's tensor-core kernels read the decode shapes faster than these
// CUDA-core dot products (bench/results/gemv.md), so the backend runs it there.
#define GEMV_DTYPE(DT, TY)                                                                     \
  GEMV_M(DT, TY, 1, GEMV_R1, GEMV_U1)                                                          \
  GEMV_M(DT, TY, 2, GEMV_R2, GEMV_U2)
#define GEMV_R1 1
#define GEMV_U1 8
#define GEMV_R2 2
#define GEMV_U2 4
GEMV_DTYPE(f16, F16)
GEMV_DTYPE(bf16, BF16)
#endif
