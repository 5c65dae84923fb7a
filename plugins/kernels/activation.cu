// Gated activations on the fused gate-up GEMM output gu [T, 2I] (gate = columns [0, I),
// up = [I, 2I)) -> out [T, I] (or on gate and up held apart: swiglu2), and plain GELU on a
// flat tensor. Pure streaming: bytes = T * I * 2 * 3 (gated) or n * 2 * 2 (GELU). VEC=8
// moves 16 bytes per access.
#include "common.cuh"

// ACT: 0 = silu (SwiGLU), 1 = gelu tanh (GeGLU). HF rounds act(gate) to the dtype before *up.
// Grid (rows, column blocks): no integer division per element.
template <typename T, int VEC, int ACT>
__device__ __forceinline__ void gated(const u16* __restrict__ gu, int rows, int inter,
                                      u16* __restrict__ out) {
  const int r = blockIdx.x;
  const int col = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (r >= rows || col >= inter) return;
  const u16* g = gu + (size_t)r * 2 * inter + col;
  float gf[VEC], uf[VEC], o[VEC];
  load_vec<T, VEC>(g, gf);
  load_vec<T, VEC>(g + inter, uf);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float a = ACT == 0 ? silu_f(gf[i]) : gelu_tanh_f(gf[i]);
    o[i] = rnd<T>(a) * uf[i];
  }
  store_vec<T, VEC>(out + (size_t)r * inter + col, o);
}

// SwiGLU of a gate and an up GEMM output held apart [T, I] each (two GEMMs the gate_up_gemm
// pass left unfused: Qwen2-MoE's shared expert, whose x feeds four GEMMs), rounded as above.
template <typename T, int VEC>
__device__ __forceinline__ void gated2(const u16* __restrict__ gate, const u16* __restrict__ up,
                                       int rows, int inter, u16* __restrict__ out) {
  const int r = blockIdx.x;
  const int col = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (r >= rows || col >= inter) return;
  const size_t at = (size_t)r * inter + col;
  float gf[VEC], uf[VEC], o[VEC];
  load_vec<T, VEC>(gate + at, gf);
  load_vec<T, VEC>(up + at, uf);
#pragma unroll
  for (int i = 0; i < VEC; ++i) o[i] = rnd<T>(silu_f(gf[i])) * uf[i];
  store_vec<T, VEC>(out + at, o);
}

// ACT: 1 = gelu tanh, 2 = gelu erf.
template <typename T, int VEC, int ACT>
__device__ __forceinline__ void plain(const u16* __restrict__ x, int n, u16* __restrict__ out) {
  const int nc = n / VEC;
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < nc; c += gridDim.x * blockDim.x) {
    float f[VEC];
    load_vec<T, VEC>(x + (size_t)c * VEC, f);
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = ACT == 1 ? gelu_tanh_f(f[i]) : gelu_erf_f(f[i]);
    store_vec<T, VEC>(out + (size_t)c * VEC, f);
  }
}

#define ACT_ENTRIES(DT, TY, VEC)                                                               \
  extern "C" __global__ void swiglu_##DT##_v##VEC(const u16* gu, int rows, int inter,          \
                                                  u16* out) {                                  \
    gated<TY, VEC, 0>(gu, rows, inter, out);                                                   \
  }                                                                                            \
  extern "C" __global__ void geglu_##DT##_v##VEC(const u16* gu, int rows, int inter,           \
                                                 u16* out) {                                   \
    gated<TY, VEC, 1>(gu, rows, inter, out);                                                   \
  }                                                                                            \
  extern "C" __global__ void swiglu2_##DT##_v##VEC(const u16* gate, const u16* up, int rows,  \
                                                   int inter, u16* out) {                      \
    gated2<TY, VEC>(gate, up, rows, inter, out);                                               \
  }                                                                                            \
  extern "C" __global__ void gelu_tanh_##DT##_v##VEC(const u16* x, int n, u16* out) {          \
    plain<TY, VEC, 1>(x, n, out);                                                              \
  }                                                                                            \
  extern "C" __global__ void gelu_erf_##DT##_v##VEC(const u16* x, int n, u16* out) {           \
    plain<TY, VEC, 2>(x, n, out);                                                              \
  }

LLMC_F16(ACT_ENTRIES(f16, F16, 8))
LLMC_F16(ACT_ENTRIES(f16, F16, 1))
LLMC_BF16(ACT_ENTRIES(bf16, BF16, 8))
LLMC_BF16(ACT_ENTRIES(bf16, BF16, 1))
