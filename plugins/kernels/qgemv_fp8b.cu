// Block-wise FP8 weight-only GEMMs (W8A16: --quant fp8-block, a block-wise FP8 checkpoint's
// own weights; quantization/qdq.py: fp8_block_pass), in a module of their own, compiled only
// for the engines that have them:
//
//   y = x @ dequant(w)^T,  dequant(w)[n, k] = e4m3(w[n, k]) * s[n, k / G], rounded once to the
//                          compute dtype, as DequantizeLinear rounds it
//
// Engine layout (lower.py): w [N, K] E4M3 bytes, s [N, K / G] in the compute dtype, G a power
// of two from 32 dividing K. Decode steps (1-16 rows of x) run qgemv.cuh's w8_gemv with
// BLOCKS (the FP8 decode loop, each byte made a 16-bit float for 16-bit MMAs with x as it is
// stored); larger steps run cuBLASLt on the weight dequant_fp8b writes in the compute dtype.
#include "qgemv.cuh"

// Prefill: the weight [n, k] in the compute dtype for cuBLASLt; 16 weights a thread.
template <typename T>
__device__ __forceinline__ void dequant_fp8b(const u8* __restrict__ w,
                                             const u16* __restrict__ scale, int n, int k,
                                             int gshift, u16* __restrict__ out) {
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 16;
  if (i >= (size_t)n * k) return;
  const int row = (int)(i / k), col = (int)(i % k);
  u32 p[8];
  dequant16_e4m3<T>(__ldg(reinterpret_cast<const uint4*>(w + i)),
                    e4m3_scale2<T>(scale[(size_t)row * (k >> gshift) + (col >> gshift)]), p);
  uint4* o = reinterpret_cast<uint4*>(out + i);
  o[0] = make_uint4(p[0], p[1], p[2], p[3]);
  o[1] = make_uint4(p[4], p[5], p[6], p[7]);
}

#define QGEMV_FP8B_DTYPE(DT, TY)                                                               \
  extern "C" __global__ void dequant_fp8b_##DT(const u8* w, const u16* scale, int n, int k,    \
                                               int gshift, u16* out) {                         \
    dequant_fp8b<TY>(w, scale, n, k, gshift, out);                                             \
  }                                                                                            \
  W8_CONFIGS(W8B_ENTRY, w8b, DT, TY)   /* w8_'s names and CTA shapes, launched alike */

#ifndef QGEMV_VARIANTS  // benchmarks compile their own variants
LLMC_F16(QGEMV_FP8B_DTYPE(f16, F16))
LLMC_BF16(QGEMV_FP8B_DTYPE(bf16, BF16))
#endif
