// Paged attention with Gemma 2's logit soft-cap: cap * tanh(s / cap) of the scaled scores
// before the mask (the kernels of paged_attention.cuh with CAP). A module of its own, so only
// the engines of models with a soft-cap compile it. Entry points: those of
// paged_attention.cu with the suffix _softcap and the cap's bits after `win`.
#include "paged_attention.cuh"

#define PREFILL_SOFTCAP_ENTRY(DT, TY, D, SUF, NW, MINB, QREG)                                 \
  extern "C" __global__ void __launch_bounds__(32 * NW, MINB)                                 \
      attn_prefill_##DT##_d##D##SUF##_softcap(ATTN_IN, ATTN_SC, int cap, int pack, u16* out) { \
    attn_prefill<TY, D, NW, QREG, true>(q, ss, cl, bt, kv, T_, B, hq, hkv, mb, bs, nb, sc,    \
                                        win, pack, out, cap);                                 \
  }
#define DECODE_SOFTCAP_ENTRY(DT, TY, D, SUF, NST)                                             \
  extern "C" __global__ void __launch_bounds__(128)                                           \
      attn_decode_##DT##_d##D##SUF##_softcap(ATTN_IN, ATTN_SC, int cap, int ns, int chunk,    \
                                             u16* out, float* wo, float* wl, int* arr,        \
                                             const int4* sched) {                             \
    pdl_trigger(); /* the o-projection GEMV after it may start streaming its weights */     \
    attn_decode<TY, D, NST, true>(q, ss, cl, bt, kv, T_, B, hq, hkv, mb, bs, nb, sc, win, ns, \
                                  chunk, out, wo, wl, arr, sched, cap);                       \
  }
#define SOFTCAP_ENTRIES(DT, TY, D)                                                            \
  PREFILL_SOFTCAP_ENTRY(DT, TY, D, _w4, 4, 3, true)                                           \
  PREFILL_SOFTCAP_ENTRY(DT, TY, D, _w8s, 8, 2, false)                                         \
  DECODE_SOFTCAP_ENTRY(DT, TY, D, , 3)                                                        \
  DECODE_SOFTCAP_ENTRY(DT, TY, D, _s2, 2)

LLMC_F16(SOFTCAP_ENTRIES(f16, F16, 64))
LLMC_F16(SOFTCAP_ENTRIES(f16, F16, 128))
LLMC_BF16(SOFTCAP_ENTRIES(bf16, BF16, 64))
LLMC_BF16(SOFTCAP_ENTRIES(bf16, BF16, 128))
