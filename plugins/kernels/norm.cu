// (Residual-add +) RMSNorm / LayerNorm, one row per block, the row kept in registers so HBM
// sees each input byte once: bytes = rows * n * 2 * (reads + writes). Entry points are
// <op>_<dtype>_v<VEC>; VEC=8 moves 16 bytes per access (n % 8 == 0), VEC=1 handles any n.
// Argument order (inputs, scalars, outputs) is the one TensorRT's ahead-of-time plugins use.
#include "common.cuh"

#define MAX_ELEMS 32  // per thread; with 1024 threads any n <= 32768

template <typename T, int VEC, bool RES, bool LN>
__device__ __forceinline__ void norm_row(const u16* __restrict__ x, const u16* __restrict__ res,
                                         const u16* __restrict__ w, const u16* __restrict__ b,
                                         int rows, int n, int eps_bits, u16* __restrict__ out,
                                         u16* __restrict__ res_out) {
  constexpr int ITEMS = MAX_ELEMS / VEC;
  __shared__ float red[32];
  const int row = blockIdx.x;
  if (row >= rows) return;
  const float eps = __int_as_float(eps_bits);
  const size_t base = (size_t)row * n;
  const int nchunks = n / VEC;
  float v[ITEMS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = threadIdx.x + it * blockDim.x;
    if (c < nchunks) {
      load_vec<T, VEC>(x + base + c * VEC, v[it]);
      if constexpr (RES) {
        float r[VEC];
        load_vec<T, VEC>(res + base + c * VEC, r);
        // HF adds in the model dtype, then normalizes the rounded sum.
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[it][i] = rnd<T>(v[it][i] + r[i]);
        store_vec<T, VEC>(res_out + base + c * VEC, v[it]);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += LN ? v[it][i] : v[it][i] * v[it][i];
    }
  }
  float mean = 0.f, rstd;
  if constexpr (LN) {
    mean = block_sum(sum, red) / n;
    float var = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int c = threadIdx.x + it * blockDim.x;
      if (c < nchunks) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) { const float d = v[it][i] - mean; var += d * d; }
      }
    }
    rstd = rsqrtf(block_sum(var, red) / n + eps);
  } else {
    rstd = rsqrtf(block_sum(sum, red) / n + eps);
  }
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int c = threadIdx.x + it * blockDim.x;
    if (c < nchunks) {
      float wf[VEC], o[VEC];
      load_vec<T, VEC>(w + c * VEC, wf);
      if constexpr (LN) {
        float bf[VEC];
        load_vec<T, VEC>(b + c * VEC, bf);
        // torch layer_norm: fp32 throughout, one rounding at the end.
#pragma unroll
        for (int i = 0; i < VEC; ++i) o[i] = (v[it][i] - mean) * rstd * wf[i] + bf[i];
      } else {
        // HF LlamaRMSNorm: weight * (x * rstd).to(dtype), the product rounded again.
#pragma unroll
        for (int i = 0; i < VEC; ++i) o[i] = wf[i] * rnd<T>(v[it][i] * rstd);
      }
      store_vec<T, VEC>(out + base + c * VEC, o);
    }
  }
}

// 1024 threads must fit the register file: cap registers at 64 a thread. The RMSNorms
// trigger the next kernel at once: it is a GEMV, which streams its weights in while the
// norm runs (gemv.cu).
#define NORM_KERNEL extern "C" __global__ void __launch_bounds__(1024)
#define NORM_ENTRIES(DT, TY, VEC)                                                              \
  NORM_KERNEL rmsnorm_##DT##_v##VEC(const u16* x, const u16* w, int rows, int n, \
                                                   int eps, u16* out) {                          \
    pdl_trigger();                                                                               \
    norm_row<TY, VEC, false, false>(x, nullptr, w, nullptr, rows, n, eps, out, nullptr);         \
  }                                                                                              \
  NORM_KERNEL add_rmsnorm_##DT##_v##VEC(const u16* x, const u16* r, const u16* w, \
                                                       int rows, int n, int eps, u16* out,       \
                                                       u16* res_out) {                           \
    pdl_trigger();                                                                               \
    norm_row<TY, VEC, true, false>(x, r, w, nullptr, rows, n, eps, out, res_out);                \
  }                                                                                              \
  NORM_KERNEL layernorm_##DT##_v##VEC(const u16* x, const u16* w, const u16* b,  \
                                                     int rows, int n, int eps, u16* out) {       \
    norm_row<TY, VEC, false, true>(x, nullptr, w, b, rows, n, eps, out, nullptr);                \
  }                                                                                              \
  NORM_KERNEL add_layernorm_##DT##_v##VEC(const u16* x, const u16* r,             \
                                                         const u16* w, const u16* b, int rows,   \
                                                         int n, int eps, u16* out,               \
                                                         u16* res_out) {                         \
    norm_row<TY, VEC, true, true>(x, r, w, b, rows, n, eps, out, res_out);                       \
  }

LLMC_F16(NORM_ENTRIES(f16, F16, 8))
LLMC_F16(NORM_ENTRIES(f16, F16, 1))
LLMC_BF16(NORM_ENTRIES(bf16, BF16, 8))
LLMC_BF16(NORM_ENTRIES(bf16, BF16, 1))
