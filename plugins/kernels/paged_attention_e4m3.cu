// Paged attention over an E4M3 pool (--kv-cache-dtype fp8): the kernels of
// paged_attention.cuh reading one byte a K/V element and dequantizing it in shared memory
// with the layer's K and V scales. A module of its own, compiled only for the engines that
// have such a pool. Entry points: those of paged_attention.cu with the suffix _e4m3, the pool
// as bytes, and the scales' fp32 bits after `win`.
#include "paged_attention.cuh"

#define PREFILL_E4M3_ENTRY(DT, TY, D, SUF, NW, MINB, QREG)                                    \
  extern "C" __global__ void __launch_bounds__(32 * NW, MINB)                                 \
      attn_prefill_##DT##_d##D##SUF##_e4m3(ATTN_IN_E4M3, ATTN_SC, int ks, int vs, int pack,   \
                                           u16* out) {                                        \
    E4M3_ONLY(attn_prefill<TY, D, NW, QREG, false, u8>(q, ss, cl, bt, kv, T_, B, hq, hkv, mb, \
                                                       bs, nb, sc, win, pack, out, 0,         \
                                                       __int_as_float(ks),                    \
                                                       __int_as_float(vs)));                  \
  }
#define DECODE_E4M3_ENTRY(DT, TY, D, SUF, NST)                                                \
  extern "C" __global__ void __launch_bounds__(128, DECODE_E4M3_MINB)                         \
      attn_decode_##DT##_d##D##SUF##_e4m3(ATTN_IN_E4M3, ATTN_SC, int ks, int vs, int ns,      \
                                          int chunk, u16* out, float* wo, float* wl,          \
                                          int* arr, const int4* sched) {                      \
    pdl_trigger(); /* the o-projection GEMV after it may start streaming its weights */     \
    E4M3_ONLY(attn_decode<TY, D, NST, false, u8>(q, ss, cl, bt, kv, T_, B, hq, hkv, mb, bs,   \
                                                 nb, sc, win, ns, chunk, out, wo, wl, arr,    \
                                                 sched, 0, __int_as_float(ks),                \
                                                 __int_as_float(vs)));                        \
  }
#define E4M3_ENTRIES(DT, TY, D)                                                               \
  PREFILL_E4M3_ENTRY(DT, TY, D, _w4, 4, 3, true)                                              \
  PREFILL_E4M3_ENTRY(DT, TY, D, _w8s, 8, 2, false)                                            \
  DECODE_E4M3_ENTRY(DT, TY, D, , 3)                                                           \
  DECODE_E4M3_ENTRY(DT, TY, D, _s2, 2)

LLMC_F16(E4M3_ENTRIES(f16, F16, 64))
LLMC_F16(E4M3_ENTRIES(f16, F16, 128))
LLMC_BF16(E4M3_ENTRIES(bf16, BF16, 64))
LLMC_BF16(E4M3_ENTRIES(bf16, BF16, 128))
