// Paged attention over an E4M3 pool with Gemma 2's logit soft-cap: the kernels of
// paged_attention.cuh with CAP and a byte pool (paged_attention_e4m3.cu says how it is read).
// Entry points: those of paged_attention_softcap.cu with _e4m3 before _softcap, the pool as
// bytes, and the K and V scales' fp32 bits after `win`, before the cap's.
#include "paged_attention.cuh"

#define PREFILL_CAP_E4M3_ENTRY(DT, TY, D, SUF, NW, MINB, QREG)                                \
  extern "C" __global__ void __launch_bounds__(32 * NW, MINB)                                 \
      attn_prefill_##DT##_d##D##SUF##_e4m3_softcap(ATTN_IN_E4M3, ATTN_SC, int ks, int vs,     \
                                                   int cap, int pack, u16* out) {             \
    E4M3_ONLY(attn_prefill<TY, D, NW, QREG, true, u8>(q, ss, cl, bt, kv, T_, B, hq, hkv, mb,  \
                                                      bs, nb, sc, win, pack, out, cap,        \
                                                      __int_as_float(ks),                     \
                                                      __int_as_float(vs)));                   \
  }
#define DECODE_CAP_E4M3_ENTRY(DT, TY, D, SUF, NST)                                            \
  extern "C" __global__ void __launch_bounds__(128, DECODE_E4M3_MINB)                         \
      attn_decode_##DT##_d##D##SUF##_e4m3_softcap(ATTN_IN_E4M3, ATTN_SC, int ks, int vs,      \
                                                  int cap, int ns, int chunk, u16* out,       \
                                                  float* wo, float* wl, int* arr,             \
                                                  const int4* sched) {                        \
    pdl_trigger(); /* the o-projection GEMV after it may start streaming its weights */     \
    E4M3_ONLY(attn_decode<TY, D, NST, true, u8>(q, ss, cl, bt, kv, T_, B, hq, hkv, mb, bs,    \
                                                nb, sc, win, ns, chunk, out, wo, wl, arr,     \
                                                sched,                                        \
                                                cap,                                          \
                                                __int_as_float(ks), __int_as_float(vs)));     \
  }
#define CAP_E4M3_ENTRIES(DT, TY, D)                                                           \
  PREFILL_CAP_E4M3_ENTRY(DT, TY, D, _w4, 4, 3, true)                                          \
  PREFILL_CAP_E4M3_ENTRY(DT, TY, D, _w8s, 8, 2, false)                                        \
  DECODE_CAP_E4M3_ENTRY(DT, TY, D, , 3)                                                       \
  DECODE_CAP_E4M3_ENTRY(DT, TY, D, _s2, 2)

LLMC_F16(CAP_E4M3_ENTRIES(f16, F16, 64))
LLMC_F16(CAP_E4M3_ENTRIES(f16, F16, 128))
LLMC_BF16(CAP_E4M3_ENTRIES(bf16, BF16, 64))
LLMC_BF16(CAP_E4M3_ENTRIES(bf16, BF16, 128))
