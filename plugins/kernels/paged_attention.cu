// Paged attention: the entry points without the logit soft-cap (the kernels and the I/O
// contract are in paged_attention.cuh; the soft-capped entries in paged_attention_softcap.cu).
#include "paged_attention.cuh"

#define PREFILL_ENTRY(DT, TY, D, SUF, NW, MINB, QREG)                                         \
  extern "C" __global__ void __launch_bounds__(32 * NW, MINB)                                 \
      attn_prefill_##DT##_d##D##SUF(ATTN_IN, ATTN_SC, int pack, u16* out) {                   \
    attn_prefill<TY, D, NW, QREG>(q, ss, cl, bt, kv, T_, B, hq, hkv, mb, bs, nb, sc, win,     \
                                  pack, out);                                                 \
  }
// _s2: 2 K/V stages, for devices whose per-block shared memory cannot hold 3 (99 KB on
// sm_86/89/120 < 100 KB for 3 stages at D=128).
#define DECODE_ENTRY(DT, TY, D, SUF, NST)                                                     \
  extern "C" __global__ void __launch_bounds__(128)                                           \
      attn_decode_##DT##_d##D##SUF(ATTN_IN, ATTN_SC, int ns, int chunk, u16* out, float* wo,  \
                                   float* wl, int* arr, const int4* sched) {                  \
    pdl_trigger(); /* the o-projection GEMV after it may start streaming its weights */     \
    attn_decode<TY, D, NST>(q, ss, cl, bt, kv, T_, B, hq, hkv, mb, bs, nb, sc, win, ns,       \
                            chunk, out, wo, wl, arr, sched);                                  \
  }
#define ATTN_ENTRIES(DT, TY, D)                                                               \
  PREFILL_ENTRY(DT, TY, D, _w4, 4, 3, true)                                                   \
  PREFILL_ENTRY(DT, TY, D, _w8s, 8, 2, false)                                                 \
  DECODE_ENTRY(DT, TY, D, , 3)                                                                \
  DECODE_ENTRY(DT, TY, D, _s2, 2)

#define DT_ENTRIES(DT, TY)                                                                    \
  ATTN_ENTRIES(DT, TY, 64)                                                                    \
  ATTN_ENTRIES(DT, TY, 128)                                                                   \
  extern "C" __global__ void attn_reduce_##DT(const float* wo, const float* wl, int rows,     \
                                              int d, int ns, u16* out) {                      \
    pdl_trigger();                                                                            \
    attn_reduce<TY>(wo, wl, rows, d, ns, out);                                                \
  }                                                                                           \
  extern "C" __global__ void kv_write_##DT(const u16* k, const u16* v, const int* ss,         \
                                           const int* cl, const int* bt, int T_, int B,       \
                                           int hkv, int d, int mb, int bs, int nb,            \
                                           u16* cache) {                                      \
    kv_write<TY>(k, v, ss, cl, bt, T_, B, hkv, d, mb, bs, nb, cache);                         \
  }

LLMC_F16(DT_ENTRIES(f16, F16))
LLMC_BF16(DT_ENTRIES(bf16, BF16))
