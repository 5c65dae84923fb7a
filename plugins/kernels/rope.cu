// Fused QKV bias + rotary embedding (+ optional write of K/V into the paged cache).
// Input qkv [T, (Hq + 2*Hkv) * D] from the fused QKV GEMM; outputs q [T,Hq,D], k, v [T,Hkv,D].
// Rotary on the first rot_dim dims of each q/k head: FORM 0 = rotate-half (HF llama),
// FORM 1 = interleaved pairs (GPT-J). Angles are pos * inv_freq[i] in fp32 (llama3 scaling
// is folded into inv_freq on the host). Streaming: bytes = T*(Hq+2Hkv)*D*2*2 (+ K/V again
// for the cache write). One block per (token, group of heads); cos/sin computed in smem. A
// thread moves 8 elements in 16-byte accesses where a head's regions split into whole units
// (rope_vec), else one pair in 2-byte ones.
// QKN (the _qknorm entries, Qwen3 / Gemma 3): a per-head RMSNorm of q and k over all D dims,
// with one weight [D] for q heads and one for k heads, before the rotation.
// E4M3 (the _cache_e4m3 entries, --kv-cache-dtype fp8): the pool holds E4M3 bytes of x /
// scale (one K and one V scale a layer), x the K or V value as q/k/v hold it; sm_89+.
#include "common.cuh"

#define MAX_HALF_ROT 256
#define MAX_ROPE_WARPS 16  // launch_rules.ROPE_PAIRS_PER_CTA / 32

// The two elements pair j of a head owns: rotated pairs first, then the pass-through dims
// [rot, d) two at a time.
template <int FORM>
__device__ __forceinline__ void pair_elems(int j, int half, int rot, int& e0, int& e1) {
  if (j < half) {
    e0 = FORM == 0 ? j : 2 * j;
    e1 = FORM == 0 ? j + half : 2 * j + 1;
  } else {
    e0 = rot + 2 * (j - half);
    e1 = e0 + 1;
  }
}

// Writes one finished pair of head h to q/k/v (and, for K/V heads, to the cache row).
// (a, b) turned by the angle whose cosine and sine are c and s.
__device__ __forceinline__ void rotate(float& a, float& b, float c, float s) {
  const float ra = a * c - b * s, rb = b * c + a * s;
  a = ra;
  b = rb;
}

template <bool CACHE>
__device__ __forceinline__ void store_pair(u16 ha, u16 hb, int t, int h, int e0, int e1, int hq,
                                           int hkv, int d, int bs, int phys, int row,
                                           int num_blocks, u16* __restrict__ q_out,
                                           u16* __restrict__ k_out, u16* __restrict__ v_out,
                                           u16* __restrict__ cache) {
  u16* dst;
  int hh;
  if (h < hq) { dst = q_out + ((size_t)t * hq + h) * d; }
  else if (h < hq + hkv) { hh = h - hq; dst = k_out + ((size_t)t * hkv + hh) * d; }
  else { hh = h - hq - hkv; dst = v_out + ((size_t)t * hkv + hh) * d; }
  dst[e0] = ha;
  dst[e1] = hb;
  if constexpr (CACHE) {
    if (h >= hq) {
      const int which = h < hq + hkv ? 0 : 1;
      u16* c = cache + ((((size_t)which * num_blocks + phys) * hkv + hh) * bs + row) * d;
      c[e0] = ha;
      c[e1] = hb;
    }
  }
}

// The 16-byte path (launch_rules.rope_vector must agree): whole 8-element units in each
// region of a head (FORM 0: the rotation's two halves; FORM 1: its interleaved pairs; the
// pass-through dims after rot).
template <int FORM>
__device__ __forceinline__ bool rope_vec(int d, int rot) {
  return d % 8 == 0 && rot % (FORM == 0 ? 16 : 8) == 0;
}
// Units a head: FORM 0's rotated units cover both halves (rot / 16 of them), then (d - rot) / 8.
template <int FORM>
__device__ __forceinline__ int rope_units(int d, int rot) {
  return FORM == 0 ? rot / 16 + (d - rot) / 8 : d / 8;
}

template <typename T, bool BIAS>
__device__ __forceinline__ void load_unit(const u16* __restrict__ src,
                                          const u16* __restrict__ bias, int off, float* f) {
  unpack8<T>(*reinterpret_cast<const uint4*>(src + off), f);
  if constexpr (BIAS) {
    // The GEMM output plus bias is materialised in the dtype in the unfused graph.
    float fb[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(bias + off), fb);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = rnd<T>(f[i] + fb[i]);
  }
}

// Elements [e, e + 8) of head h to q/k/v (and, for K/V heads, to the cache row).
template <typename T, bool CACHE>
__device__ __forceinline__ void store_unit(const float* f, int t, int h, int e, int hq, int hkv,
                                           int d, int bs, int phys, int row, int num_blocks,
                                           u16* __restrict__ q_out, u16* __restrict__ k_out,
                                           u16* __restrict__ v_out, u16* __restrict__ cache) {
  uint4 v;
  v.x = T::pack2(f[0], f[1]); v.y = T::pack2(f[2], f[3]);
  v.z = T::pack2(f[4], f[5]); v.w = T::pack2(f[6], f[7]);
  const bool is_q = h < hq, is_k = !is_q && h < hq + hkv;
  const int hh = is_q ? h : h - hq - (is_k ? 0 : hkv);
  u16* dst = (is_q ? q_out + ((size_t)t * hq + h) * d
                   : (is_k ? k_out : v_out) + ((size_t)t * hkv + hh) * d);
  *reinterpret_cast<uint4*>(dst + e) = v;
  if constexpr (CACHE) {
    if (!is_q) {
      u16* c = cache + ((((size_t)!is_k * num_blocks + phys) * hkv + hh) * bs + row) * d;
      *reinterpret_cast<uint4*>(c + e) = v;
    }
  }
}

// (E4M3 pool) The cache row of K or V head h (h >= hq), and its scale.
__device__ __forceinline__ u8* e4m3_row(int h, int hq, int hkv, int d, int bs, int phys, int row,
                                        int num_blocks, u8* cache, float k_scale,
                                        float v_scale, float& s) {
  const int which = h < hq + hkv ? 0 : 1, hh = h - hq - which * hkv;
  s = which ? v_scale : k_scale;
  return cache + ((((size_t)which * num_blocks + phys) * hkv + hh) * bs + row) * d;
}

// (E4M3 pool) One finished pair of K or V head h -> its cache row as E4M3 bytes of x / scale:
// QuantizeLinear of the value the graph holds (rounded to T), nearest even, saturating.
template <typename T>
__device__ __forceinline__ void store_pair_e4m3(u16 ha, u16 hb, int h, int e0, int e1, int hq,
                                                int hkv, int d, int bs, int phys, int row,
                                                int num_blocks, u8* __restrict__ cache,
                                                float k_scale, float v_scale) {
  if (h < hq) return;
  float s;
  u8* c = e4m3_row(h, hq, hkv, d, bs, phys, row, num_blocks, cache, k_scale, v_scale, s);
  const unsigned short b = e4m3x2(__fdiv_rn(T::to_f(ha), s), __fdiv_rn(T::to_f(hb), s));
  c[e0] = (u8)(b & 0xff);
  c[e1] = (u8)(b >> 8);
}

// (E4M3 pool) Elements [e, e + 8) of K or V head h, as store_unit stores them (rounded to T)
// -> its cache row as E4M3 bytes of x / scale, in one 8-byte store.
template <typename T>
__device__ __forceinline__ void store_unit_e4m3(const float* f, int h, int e, int hq, int hkv,
                                                int d, int bs, int phys, int row,
                                                int num_blocks, u8* __restrict__ cache,
                                                float k_scale, float v_scale) {
  if (h < hq) return;
  float s, x[8];
  u8* c = e4m3_row(h, hq, hkv, d, bs, phys, row, num_blocks, cache, k_scale, v_scale, s);
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = __fdiv_rn(rnd<T>(f[i]), s);
  *reinterpret_cast<uint2*>(c + e) = make_uint2(e4m3x4(x[0], x[1], x[2], x[3]),
                                                e4m3x4(x[4], x[5], x[6], x[7]));
}

// CACHE: K/V written into a 16-bit pool `cache`; E4M3: into an E4M3 pool `cache8`.
template <typename T, int FORM, bool BIAS, bool CACHE, bool QKN = false, bool E4M3 = false>
__device__ __forceinline__ void rope_token(
    const u16* __restrict__ qkv, const u16* __restrict__ bias, const int* __restrict__ pos_ids,
    const float* __restrict__ inv_freq, const int* __restrict__ seq_starts,
    const int* __restrict__ block_tables, int T_, int hq, int hkv, int d, int rot, int B,
    int max_blocks, int bs, u16* __restrict__ q_out, u16* __restrict__ k_out,
    u16* __restrict__ v_out, u16* __restrict__ cache, int num_blocks,
    const u16* __restrict__ q_norm = nullptr, const u16* __restrict__ k_norm = nullptr,
    int eps_bits = 0, u8* __restrict__ cache8 = nullptr, float k_scale = 1.f,
    float v_scale = 1.f) {
  __shared__ float cs[MAX_HALF_ROT][2];
  const int t = blockIdx.x;
  if (t >= T_) return;
  const int half = rot >> 1;
  const float pos = (float)pos_ids[t];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float s, c;
    sincosf(pos * inv_freq[i], &s, &c);  // precise: angles reach 1e5 rad at long context
    cs[i][0] = c;
    cs[i][1] = s;
  }
  __syncthreads();
  int phys = 0, row = 0;
  if constexpr (CACHE || E4M3) {
    const int s = find_seq(seq_starts, B, t);
    const int p = pos_ids[t];
    phys = block_tables[(size_t)s * max_blocks + p / bs];
    row = p % bs;
  }
  // gridDim.y CTAs share a token's heads: at decode a token is a few thousand pairs, too
  // little latency-bound work for one CTA to do alone.
  const int htot = hq + 2 * hkv, hd = d >> 1;
  const int per = (htot + gridDim.y - 1) / gridDim.y, h0 = blockIdx.y * per;
  const int n_pairs = min(per, htot - h0) * hd;
  const u16* src = qkv + (size_t)t * htot * d;
  if constexpr (QKN) {
    // One pass, a thread a pair: the launch rule gives the CTA a thread for each of its pairs
    // and D a multiple of 64, so a head is one or more whole warps, and its sum of squares
    // a warp sum plus, across its warps, shared memory.
    __shared__ float red[MAX_ROPE_WARPS];
    const int idx = threadIdx.x, h = h0 + idx / hd, j = idx % hd;
    const bool live = idx < n_pairs;
    int e0, e1;
    pair_elems<FORM>(j, half, rot, e0, e1);
    float a = 0.f, b = 0.f;
    if (live) {
      a = T::to_f(src[h * d + e0]);
      b = T::to_f(src[h * d + e1]);
      if constexpr (BIAS) {
        a = rnd<T>(a + T::to_f(bias[h * d + e0]));
        b = rnd<T>(b + T::to_f(bias[h * d + e1]));
      }
    }
    const float ss = warp_sum(a * a + b * b);
    const int warp = idx >> 5, wph = hd >> 5;
    if ((idx & 31) == 0) red[warp] = ss;
    __syncthreads();
    if (!live) return;
    if (h < hq + hkv) {
      float sum = 0.f;
      for (int w = warp - warp % wph; w < warp - warp % wph + wph; ++w) sum += red[w];
      const float rstd = rsqrtf(sum / d + __int_as_float(eps_bits));
      const u16* w = h < hq ? q_norm : k_norm;
      // HF: weight * (x * rstd).to(dtype), the product in the dtype
      a = rnd<T>(T::to_f(w[e0]) * rnd<T>(a * rstd));
      b = rnd<T>(T::to_f(w[e1]) * rnd<T>(b * rstd));
      if (j < half) rotate(a, b, cs[j][0], cs[j][1]);
    }
    store_pair<CACHE>(T::from_f(a), T::from_f(b), t, h, e0, e1, hq, hkv, d, bs, phys, row,
                      num_blocks, q_out, k_out, v_out, cache);
    if constexpr (E4M3)
      store_pair_e4m3<T>(T::from_f(a), T::from_f(b), h, e0, e1, hq, hkv, d, bs, phys, row,
                         num_blocks, cache8, k_scale, v_scale);
    return;
  }
  if (rope_vec<FORM>(d, rot)) {
    // 16-byte accesses: a thread a unit of 8 elements (FORM 0's rotated units: 8 elements
    // and their 8 partners half a rotation away), instead of a pair in 2-byte accesses.
    const int units = rope_units<FORM>(d, rot), n_units = min(per, htot - h0) * units;
    for (int idx = threadIdx.x; idx < n_units; idx += blockDim.x) {
      const int h = h0 + idx / units, u = idx % units;
      const bool rotated = h < hq + hkv;
      if (FORM == 0 && u < half / 8) {
        float a[8], b[8];
        load_unit<T, BIAS>(src, bias, h * d + 8 * u, a);
        load_unit<T, BIAS>(src, bias, h * d + 8 * u + half, b);
        if (rotated) {
#pragma unroll
          for (int i = 0; i < 8; ++i) rotate(a[i], b[i], cs[8 * u + i][0], cs[8 * u + i][1]);
        }
        store_unit<T, CACHE>(a, t, h, 8 * u, hq, hkv, d, bs, phys, row, num_blocks, q_out,
                             k_out, v_out, cache);
        store_unit<T, CACHE>(b, t, h, 8 * u + half, hq, hkv, d, bs, phys, row, num_blocks,
                             q_out, k_out, v_out, cache);
        if constexpr (E4M3) {
          store_unit_e4m3<T>(a, h, 8 * u, hq, hkv, d, bs, phys, row, num_blocks, cache8,
                             k_scale, v_scale);
          store_unit_e4m3<T>(b, h, 8 * u + half, hq, hkv, d, bs, phys, row, num_blocks, cache8,
                             k_scale, v_scale);
        }
      } else {
        // FORM 1's rotated units (4 adjacent pairs) and either form's pass-through dims
        const int e = FORM == 0 ? rot + 8 * (u - half / 8) : 8 * u;
        float a[8];
        load_unit<T, BIAS>(src, bias, h * d + e, a);
        if (rotated && e < rot) {
#pragma unroll
          for (int i = 0; i < 4; ++i)
            rotate(a[2 * i], a[2 * i + 1], cs[e / 2 + i][0], cs[e / 2 + i][1]);
        }
        store_unit<T, CACHE>(a, t, h, e, hq, hkv, d, bs, phys, row, num_blocks, q_out, k_out,
                             v_out, cache);
        if constexpr (E4M3)
          store_unit_e4m3<T>(a, h, e, hq, hkv, d, bs, phys, row, num_blocks, cache8, k_scale,
                             v_scale);
      }
    }
    return;
  }
  for (int idx = threadIdx.x; idx < n_pairs; idx += blockDim.x) {
    const int h = h0 + idx / hd, j = idx % hd;
    int e0, e1;  // the two elements this thread owns
    pair_elems<FORM>(j, half, rot, e0, e1);
    float a = T::to_f(src[h * d + e0]), b = T::to_f(src[h * d + e1]);
    if constexpr (BIAS) {
      // The GEMM output plus bias is materialised in the dtype in the unfused graph.
      a = rnd<T>(a + T::to_f(bias[h * d + e0]));
      b = rnd<T>(b + T::to_f(bias[h * d + e1]));
    }
    if (h < hq + hkv && j < half) rotate(a, b, cs[j][0], cs[j][1]);
    store_pair<CACHE>(T::from_f(a), T::from_f(b), t, h, e0, e1, hq, hkv, d, bs, phys, row,
                      num_blocks, q_out, k_out, v_out, cache);
    if constexpr (E4M3)
      store_pair_e4m3<T>(T::from_f(a), T::from_f(b), h, e0, e1, hq, hkv, d, bs, phys, row,
                         num_blocks, cache8, k_scale, v_scale);
  }
}

#define ROPE_ARGS int T_, int hq, int hkv, int d, int rot
#define ROPE_OUT u16 *q, u16 *k, u16 *v
#define CACHE_IN const int *ss, const int *bt
#define CACHE_SC int B, int mb, int bs, int nb
#define ROPE_ENTRIES(DT, TY, FN, FORM)                                                        \
  extern "C" __global__ void rope_##FN##_##DT(const u16* x, const int* p, const float* f,     \
                                              ROPE_ARGS, ROPE_OUT) {                          \
    rope_token<TY, FORM, false, false>(x, nullptr, p, f, nullptr, nullptr, T_, hq, hkv, d,    \
                                       rot, 0, 0, 1, q, k, v, nullptr, 0);                    \
  }                                                                                           \
  extern "C" __global__ void rope_bias_##FN##_##DT(const u16* x, const u16* b, const int* p,  \
                                                   const float* f, ROPE_ARGS, ROPE_OUT) {     \
    rope_token<TY, FORM, true, false>(x, b, p, f, nullptr, nullptr, T_, hq, hkv, d, rot, 0,   \
                                      0, 1, q, k, v, nullptr, 0);                             \
  }                                                                                           \
  extern "C" __global__ void rope_cache_##FN##_##DT(const u16* x, const int* p,               \
                                                    const float* f, CACHE_IN, ROPE_ARGS,      \
                                                    CACHE_SC, ROPE_OUT, u16* kv) {            \
    rope_token<TY, FORM, false, true>(x, nullptr, p, f, ss, bt, T_, hq, hkv, d, rot, B, mb,   \
                                      bs, q, k, v, kv, nb);                                   \
  }                                                                                           \
  extern "C" __global__ void rope_bias_cache_##FN##_##DT(const u16* x, const u16* b,          \
                                                         const int* p, const float* f,        \
                                                         CACHE_IN, ROPE_ARGS, CACHE_SC,       \
                                                         ROPE_OUT, u16* kv) {                 \
    rope_token<TY, FORM, true, true>(x, b, p, f, ss, bt, T_, hq, hkv, d, rot, B, mb, bs, q,   \
                                     k, v, kv, nb);                                           \
  }
// With the q/k norm: its weights after the bias, its eps after the cache scalars.
#define QKNORM_ENTRIES(DT, TY, FN, FORM)                                                      \
  extern "C" __global__ void rope_qknorm_cache_##FN##_##DT(                                   \
      const u16* x, const u16* qn, const u16* kn, const int* p, const float* f, CACHE_IN,     \
      ROPE_ARGS, CACHE_SC, int eps, ROPE_OUT, u16* kv) {                                      \
    rope_token<TY, FORM, false, true, true>(x, nullptr, p, f, ss, bt, T_, hq, hkv, d, rot, B, \
                                            mb, bs, q, k, v, kv, nb, qn, kn, eps);            \
  }                                                                                           \
  extern "C" __global__ void rope_bias_qknorm_cache_##FN##_##DT(                              \
      const u16* x, const u16* b, const u16* qn, const u16* kn, const int* p, const float* f, \
      CACHE_IN, ROPE_ARGS, CACHE_SC, int eps, ROPE_OUT, u16* kv) {                            \
    rope_token<TY, FORM, true, true, true>(x, b, p, f, ss, bt, T_, hq, hkv, d, rot, B, mb,    \
                                           bs, q, k, v, kv, nb, qn, kn, eps);                 \
  }

// The E4M3 pool: the entries that write the cache, _e4m3 after _cache; the K and V scales'
// fp32 bits after the cache scalars (and the q/k norm's eps).
#define E4M3_SC int ks, int vs
#define E4M3_ARGS kv, __int_as_float(ks), __int_as_float(vs)
#define E4M3_ENTRIES(DT, TY, FN, FORM)                                                        \
  extern "C" __global__ void rope_cache_e4m3_##FN##_##DT(const u16* x, const int* p,          \
                                                         const float* f, CACHE_IN, ROPE_ARGS, \
                                                         CACHE_SC, E4M3_SC, ROPE_OUT,         \
                                                         u8* kv) {                            \
    rope_token<TY, FORM, false, false, false, true>(x, nullptr, p, f, ss, bt, T_, hq, hkv, d, \
                                                    rot, B, mb, bs, q, k, v, nullptr, nb,     \
                                                    nullptr, nullptr, 0, E4M3_ARGS);          \
  }                                                                                           \
  extern "C" __global__ void rope_bias_cache_e4m3_##FN##_##DT(                                \
      const u16* x, const u16* b, const int* p, const float* f, CACHE_IN, ROPE_ARGS,          \
      CACHE_SC, E4M3_SC, ROPE_OUT, u8* kv) {                                                  \
    rope_token<TY, FORM, true, false, false, true>(x, b, p, f, ss, bt, T_, hq, hkv, d, rot,   \
                                                   B, mb, bs, q, k, v, nullptr, nb, nullptr,  \
                                                   nullptr, 0, E4M3_ARGS);                    \
  }                                                                                           \
  extern "C" __global__ void rope_qknorm_cache_e4m3_##FN##_##DT(                              \
      const u16* x, const u16* qn, const u16* kn, const int* p, const float* f, CACHE_IN,     \
      ROPE_ARGS, CACHE_SC, int eps, E4M3_SC, ROPE_OUT, u8* kv) {                              \
    rope_token<TY, FORM, false, false, true, true>(x, nullptr, p, f, ss, bt, T_, hq, hkv, d,  \
                                                   rot, B, mb, bs, q, k, v, nullptr, nb, qn,  \
                                                   kn, eps, E4M3_ARGS);                       \
  }                                                                                           \
  extern "C" __global__ void rope_bias_qknorm_cache_e4m3_##FN##_##DT(                         \
      const u16* x, const u16* b, const u16* qn, const u16* kn, const int* p, const float* f, \
      CACHE_IN, ROPE_ARGS, CACHE_SC, int eps, E4M3_SC, ROPE_OUT, u8* kv) {                    \
    rope_token<TY, FORM, true, false, true, true>(x, b, p, f, ss, bt, T_, hq, hkv, d, rot, B, \
                                                  mb, bs, q, k, v, nullptr, nb, qn, kn, eps,  \
                                                  E4M3_ARGS);                                 \
  }

// a dtype's entries in both FORMs (the top of this file): rotate-half, interleaved pairs
#define ROPE_FORM(DT, TY, FN, FORM)                                                           \
  ROPE_ENTRIES(DT, TY, FN, FORM) QKNORM_ENTRIES(DT, TY, FN, FORM) E4M3_ENTRIES(DT, TY, FN, FORM)
#define ROPE_DTYPE(DT, TY) ROPE_FORM(DT, TY, half, 0) ROPE_FORM(DT, TY, interleaved, 1)

LLMC_F16(ROPE_DTYPE(f16, F16))
LLMC_BF16(ROPE_DTYPE(bf16, BF16))
