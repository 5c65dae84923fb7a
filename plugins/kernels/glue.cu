// Glue of the cuda backend around the GEMMs: the embedding lookup, the gather of each
// sequence's last token row before the LM head, and the cast of the logits to fp32.
// Pure copies: bytes = rows * H * 2 * 2 (gathers), n * (2 + 4) (cast). VEC=8 moves 16 bytes
// per access (H or n a multiple of 8), VEC=1 handles any width.
//
// Entry points and argument order (inputs, int32 scalars, outputs):
//   embedding_{f16,bf16}_v{8,1}(const int* ids, const u16* table, int T, int H, int V, u16* out)
//       out[t, :] = table[ids[t], :]; grid (T), one row a block.
//   gather_rows_{f16,bf16}_v{8,1}(const u16* x, const int* rows, int B, int H, int N, u16* out)
//       out[b, :] = x[rows[b], :], x has N rows; grid (B).
//   cast_f32_{f16,bf16}_v{8,1}(const u16* x, int n, float* out)
//       grid-stride over n elements.
//   add_{f16,bf16}_v{8,1}(const u16* a, const u16* b, int n, u16* out)
//       out = a + b (a residual sum no norm follows: the last layer's), fp32 then rounded.
//   embedding_scale_{f16,bf16}_v{8,1}(const int* ids, const u16* table, int T, int H, int V,
//                                     int scale, u16* out)
//       out[t, :] = table[ids[t], :] * scale, rounded to the dtype (Gemma: sqrt(hidden));
//       scale is an fp32 bit pattern.
//   softcap_f32(const float* x, int n, int cap, float* out)
//       out = cap * tanh(x / cap) over fp32 logits (Gemma 2's final soft-cap); cap as bits.
// An index outside [0, V) / [0, N) writes a row of zeros: a bad token id from a client must
// not read outside the table (and a zero row is easy to spot downstream).
#include "common.cuh"

template <int VEC>
__device__ __forceinline__ void copy_rows(const int* __restrict__ idx, const u16* __restrict__ src,
                                          int rows, int width, int src_rows,
                                          u16* __restrict__ out) {
  typedef typename Vec<VEC>::type V;
  const int r = blockIdx.x;
  if (r >= rows) return;
  const int s = idx[r];
  const bool ok = s >= 0 && s < src_rows;
  const V* in = reinterpret_cast<const V*>(src + (size_t)(ok ? s : 0) * width);
  V* o = reinterpret_cast<V*>(out + (size_t)r * width);
  const int nc = width / VEC;
  for (int c = threadIdx.x; c < nc; c += blockDim.x) o[c] = ok ? in[c] : V{};
}

// copy_rows with each value times `scale` (converted, so the dtype matters here).
template <typename T, int VEC>
__device__ __forceinline__ void scaled_rows(const int* __restrict__ idx,
                                            const u16* __restrict__ src, int rows, int width,
                                            int src_rows, float scale, u16* __restrict__ out) {
  const int r = blockIdx.x;
  if (r >= rows) return;
  const int s = idx[r];
  const bool ok = s >= 0 && s < src_rows;
  const u16* in = src + (size_t)(ok ? s : 0) * width;
  u16* o = out + (size_t)r * width;
  const int nc = width / VEC;
  for (int c = threadIdx.x; c < nc; c += blockDim.x) {
    float f[VEC];
    load_vec<T, VEC>(in + (size_t)c * VEC, f);
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = ok ? f[i] * scale : 0.f;
    store_vec<T, VEC>(o + (size_t)c * VEC, f);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void cast_f32(const u16* __restrict__ x, int n, float* __restrict__ out) {
  const int nc = n / VEC;
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < nc; c += gridDim.x * blockDim.x) {
    float f[VEC];
    load_vec<T, VEC>(x + (size_t)c * VEC, f);
    if constexpr (VEC == 8) {
      float4* o = reinterpret_cast<float4*>(out + (size_t)c * VEC);
      o[0] = make_float4(f[0], f[1], f[2], f[3]);
      o[1] = make_float4(f[4], f[5], f[6], f[7]);
    } else {
      out[c] = f[0];
    }
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void add(const u16* __restrict__ a, const u16* __restrict__ b, int n,
                                    u16* __restrict__ out) {
  const int nc = n / VEC;
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < nc; c += gridDim.x * blockDim.x) {
    float x[VEC], y[VEC];
    load_vec<T, VEC>(a + (size_t)c * VEC, x);
    load_vec<T, VEC>(b + (size_t)c * VEC, y);
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] += y[i];
    store_vec<T, VEC>(out + (size_t)c * VEC, x);
  }
}

// The copies move bits, so both dtypes share one body; the dtype suffix keeps every entry
// named <op>_<dtype>_v<vec> like the other modules.
#define GLUE_ENTRIES(DT, TY, VEC)                                                              \
  extern "C" __global__ void embedding_##DT##_v##VEC(const int* ids, const u16* table, int T,  \
                                                     int H, int V, u16* out) {                 \
    copy_rows<VEC>(ids, table, T, H, V, out);                                                  \
  }                                                                                            \
  extern "C" __global__ void gather_rows_##DT##_v##VEC(const u16* x, const int* rows, int B,   \
                                                       int H, int N, u16* out) {               \
    copy_rows<VEC>(rows, x, B, H, N, out);                                                     \
  }                                                                                            \
  extern "C" __global__ void cast_f32_##DT##_v##VEC(const u16* x, int n, float* out) {         \
    cast_f32<TY, VEC>(x, n, out);                                                              \
  }                                                                                            \
  extern "C" __global__ void add_##DT##_v##VEC(const u16* a, const u16* b, int n, u16* out) {  \
    add<TY, VEC>(a, b, n, out);                                                                \
  }                                                                                            \
  extern "C" __global__ void embedding_scale_##DT##_v##VEC(const int* ids, const u16* table,   \
                                                           int T, int H, int V, int scale,     \
                                                           u16* out) {                         \
    scaled_rows<TY, VEC>(ids, table, T, H, V, __int_as_float(scale), out);                     \
  }

// Gemma 2's final-logit soft-cap, grid-stride over fp32 logits; precise tanhf (the logits are
// returned, and sampled, as they are).
extern "C" __global__ void softcap_f32(const float* __restrict__ x, int n, int cap_bits,
                                       float* __restrict__ out) {
  const float cap = __int_as_float(cap_bits);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = cap * tanhf(x[i] / cap);
}

LLMC_F16(GLUE_ENTRIES(f16, F16, 8))
LLMC_F16(GLUE_ENTRIES(f16, F16, 1))
LLMC_BF16(GLUE_ENTRIES(bf16, BF16, 8))
LLMC_BF16(GLUE_ENTRIES(bf16, BF16, 1))
