// INT4 weights with zero points (an AutoAWQ or asymmetric GPTQ checkpoint's own codes, W =
// (u - z) * s with z per output row and group) or with offsets (a GGUF file's Q4_1, W =
// (u - 8) * s + o): qgemv.cuh's kernels with ZP = ZERO_POINTS or OFFSETS, in a module of
// their own, compiled only for the engines that have such weights. Entry points: the w4 and
// w4g ones of qgemv.cu as w4zp_... and w4gzp_..., and dequant_int4_zp_<dtype> for prefill,
// each taking the zero points zp [N, K / G] (a byte each, 0 to 16) as their last argument;
// w4off_..., w4goff_... and dequant_int4_off_<dtype>, the offsets [N, K / G] (in the compute
// dtype) there.
#include "qgemv.cuh"

#define QGEMV_ZP_DTYPE(DT, TY)                                                                 \
  extern "C" __global__ void dequant_int4_zp_##DT(const u8* w, const u16* scale,               \
                                                  const u16* pre, int n, int k, int gshift,    \
                                                  u16* out, const u8* zp) {                    \
    dequant_int4<TY>(w, scale, pre, n, k, gshift, out, zp);                                    \
  }                                                                                            \
  extern "C" __global__ void dequant_int4_off_##DT(const u8* w, const u16* scale,              \
                                                   const u16* pre, int n, int k, int gshift,   \
                                                   u16* out, const u16* off) {                 \
    dequant_int4<TY>(w, scale, pre, n, k, gshift, out, nullptr, off);                          \
  }                                                                                            \
  W4_CONFIGS(W4ZP_ENTRY, w4zp, DT, TY)                                                         \
  W4G_CONFIG(W4GZP_ENTRY, w4gzp, DT, TY)                                                       \
  W4GW_CONFIG(W4GZP_ENTRY, w4gwzp, DT, TY)                                                     \
  W4OFF_CONFIGS(W4OFF_ENTRY, w4off, DT, TY)                                                    \
  W4G_CONFIG(W4GOFF_ENTRY, w4goff, DT, TY)                                                     \
  W4GW_CONFIG(W4GOFF_ENTRY, w4gwoff, DT, TY)

LLMC_F16(QGEMV_ZP_DTYPE(f16, F16))
LLMC_BF16(QGEMV_ZP_DTYPE(bf16, BF16))
