// Quantized GEMMs of the cuda backend: the entry points of the kernels in qgemv.cuh (what
// they compute and the engine layouts are there), for the symmetric INT4 and the FP8 engines.
// The zero-point INT4 kernels are qgemv_zp.cu's, compiled only for the engines that have them.
#include "qgemv.cuh"

#define QGEMV_DTYPE(DT, TY)                                                                    \
  extern "C" __global__ void dequant_int4_##DT(const u8* w, const u16* scale, const u16* pre,   \
                                               int n, int k, int gshift, u16* out) {           \
    dequant_int4<TY>(w, scale, pre, n, k, gshift, out);                                        \
  }                                                                                            \
  extern "C" __global__ void quantize_fp8_##DT(const u16* x, int sx, int count, u8* out) {      \
    quantize_fp8<TY>(x, __int_as_float(sx), count, out);                                       \
  }                                                                                            \
  extern "C" __global__ void quantize_fp8_rows_##DT(const u16* x, int sx, int k,               \
                                                    const int* first, u8* out,                 \
                                                    float* row_scale) {                        \
    quantize_fp8_rows<TY>(x, __int_as_float(sx), k, first, out, row_scale);                    \
  }                                                                                            \
  W4_CONFIGS(W4_ENTRY, w4, DT, TY)                                                             \
  W4G_CONFIG(W4G_ENTRY, w4g, DT, TY)                                                           \
  W4GW_CONFIG(W4G_ENTRY, w4gw, DT, TY)                                                         \
  W8_CONFIGS(W8_ENTRY, w8, DT, TY)

#ifndef QGEMV_VARIANTS  // benchmarks compile their own variants
LLMC_F16(QGEMV_DTYPE(f16, F16))
LLMC_BF16(QGEMV_DTYPE(bf16, BF16))
#endif
