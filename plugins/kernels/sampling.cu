// Token sampling on the GPU with the host sampler's rules (runtime/sampler.py `sample`), so a
// decode step needs no copy of the logits to the host and fits in a CUDA graph.
//
// Entry points and argument order (inputs, int32 scalars, outputs):
//   sample_f32(const float* logits,        [B, V] fp32
//              const float* temperature,   [B]  0 = greedy
//              const int* top_k,           [B]  0 (or >= V) = off
//              const float* top_p,         [B]  1 = off, in (0, 1]
//              const unsigned long long* seed,  [B]
//              const int* counter,         [B]  tokens this row's sequence sampled so far
//              int B, int V,
//              int* token,                 [B]
//              float* logprob)             [B] or null: log_softmax(logits / T)[token] over
//                                          the whole row (T = 1 for greedy rows)
// Grid (B), one CTA a row, blockDim a multiple of 32 (<= 1024).
//   ban_tokens_f32(float* logits,          [B, V] fp32, in place
//                  const unsigned* allowed, [B, ceil(V / 32)]: bit t % 32 of word t / 32 set
//                                           = token t allowed (llguidance's bitmask layout)
//                  int B, int V)
// Grid (ceil(ceil(V / 32) / blockDim), B): a thread a word; every banned token's logit
// becomes -inf. A structured output's mask (runtime/structured.py), applied before sample_f32
// so that its rows sample on the GPU like any other.
//
// Rules, as the host: T = 0 -> argmax, ties to the lowest index (numpy argmax). Otherwise
// z = logits / T; top-k keeps every z >= the k-th largest (ties at the cut all stay); softmax;
// top-p keeps the smallest prefix of the probabilities sorted descending, ties in index order
// (numpy's stable argsort), whose mass reaches top_p; then one draw by inverse CDF in index
// order. The draw's uniform is Philox4x32-10 keyed by the row's seed with the counter as the
// counter: the same (seed, counter) gives the same token whatever batch slot the row sits
// in, and each step of a sequence a fresh draw.
//
// The cut-offs are found without sorting: logits map to order-preserving uint32 keys, and a
// radix-16 descent over the key bits (8 passes over the row, each a deterministic block
// reduction of 16 bins) finds the exact key of the k-th largest logit, or of the logit where
// the probability mass reaches top_p. The row is re-read each pass: from L2 after the first.
// Every sum is a fixed-order block reduction, so a launch is bit-for-bit repeatable.
#include "common.cuh"

#define SAMPLE_MAX_THREADS 1024
#define NO_INDEX 0x7fffffff

// Philox4x32-10 (Salmon et al., SC'11; curand's and JAX's generator), written out because
// NVRTC has no curand headers.
struct U4 { u32 x, y, z, w; };

__device__ __forceinline__ U4 philox4x32_10(U4 c, u32 k0, u32 k1) {
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const u32 hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const u32 hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// Order-preserving key of a float: a > b <=> key(a) > key(b) (positive NaN above +inf).
// -0 maps to +0's key, since the host compares them equal (a top-k tie, not two values).
__device__ __forceinline__ u32 fkey(float f) {
  u32 u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(u32 k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Block-wide max; `red` holds 32 values. Every thread gets the result.
__device__ __forceinline__ unsigned long long block_max_u64(unsigned long long v,
                                                            unsigned long long* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  v = lane < nw ? red[lane] : 0ull;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Block-wide sums of 16 bins, left in red[512 .. 527] (red holds 528 floats); fixed order.
__device__ __forceinline__ void block_sum16(float (&b)[16], float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < 16; ++j) b[j] = warp_sum(b[j]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < 16; ++j) red[warp * 16 + j] = b[j];
  }
  __syncthreads();
  if (threadIdx.x < 16) {
    float s = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += red[w * 16 + threadIdx.x];
    red[512 + threadIdx.x] = s;
  }
  __syncthreads();
}

// Block-wide inclusive prefix sum in thread order; `red` holds 32 floats.
__device__ __forceinline__ float block_incl_scan(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.f;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float n = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += n;
    }
    __syncwarp();
    red[lane] = t;
  }
  __syncthreads();
  return warp > 0 ? v + red[warp - 1] : v;
}

struct Smem {
  float red[528];
  unsigned long long redu[32];
  float incl[SAMPLE_MAX_THREADS];
  int pick;
};

// The element whose interval [prefix before it, prefix after it) of the weights in index
// order holds r: inverse-CDF search, tile by tile, stopping at the first tile that holds it.
// Where rounding leaves r past the last interval, the last element of positive weight.
template <typename W>
__device__ __forceinline__ int scan_pick(int V, float r, W weight, Smem& s) {
  __syncthreads();  // earlier readers of s.pick are done
  if (threadIdx.x == 0) s.pick = NO_INDEX;
  float running = 0.f;
  int last = -1;
  for (int base = 0; base < V; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const float w = i < V ? weight(i) : 0.f;
    if (w > 0.f) last = i;
    const float incl = running + block_incl_scan(w, s.red);
    s.incl[threadIdx.x] = incl;
    __syncthreads();
    // The left edge is the previous element's right edge as stored, so the intervals of a
    // tile tile [running, total) with no gap or overlap from recomputation.
    const float excl = threadIdx.x ? s.incl[threadIdx.x - 1] : running;
    const bool hit = w > 0.f && excl <= r && r < incl;
    if (hit) atomicMin(&s.pick, i);
    running = s.incl[blockDim.x - 1];
    if (__syncthreads_or(hit)) break;
  }
  int tok = s.pick;
  if (tok == NO_INDEX) {
    const unsigned long long l = block_max_u64((unsigned long long)(last + 1), s.redu);
    tok = (int)l - 1;
  }
  return tok;
}

// Largest key t with W(key >= t) >= target among the candidates (key >= lo), where W sums
// `weight` (1 for counts, probability mass otherwise). With `relative`, target is a fraction
// of the candidates' total and comes back absolute. above = W(key > t), at = W(key == t).
// One pass a hex digit of the key, from the top; a digit is taken only where its bin holds
// weight, so t is always the key of a candidate, even where rounding keeps the cumulative sum
// just short of the target.
template <typename W>
__device__ __forceinline__ u32 radix_select(const float* __restrict__ x, int V, u32 lo,
                                            W weight, float& target, bool relative,
                                            float& above, float& at, Smem& s) {
  u32 prefix = 0;
  float acc = 0.f;
  for (int shift = 28; shift >= 0; shift -= 4) {
    const u32 hi_mask = shift == 28 ? 0u : ~0u << (shift + 4);
    float b[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) b[j] = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float xi = x[i];
      const u32 k = fkey(xi);
      if (k < lo || (k & hi_mask) != prefix) continue;
      const float w = weight(xi);
      const u32 d = (k >> shift) & 15u;
#pragma unroll
      for (int j = 0; j < 16; ++j) b[j] += d == (u32)j ? w : 0.f;
    }
    block_sum16(b, s.red);
    const float* bins = s.red + 512;
    if (relative && shift == 28) {
      float tot = 0.f;
      for (int j = 0; j < 16; ++j) tot += bins[j];
      target *= tot;
    }
    int d = -1, last = 15;
    float acc_last = acc;
    for (int j = 15; j >= 0; --j) {
      if (bins[j] > 0.f) {
        if (acc + bins[j] >= target) { d = j; break; }
        last = j;
        acc_last = acc;
      }
      acc += bins[j];
    }
    if (d < 0) { d = last; acc = acc_last; }
    prefix |= (u32)d << shift;
    at = bins[d];
  }
  above = acc;
  return prefix;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_MAX_THREADS)
sample_f32(const float* __restrict__ logits, const float* __restrict__ temperature,
           const int* __restrict__ top_k, const float* __restrict__ top_p,
           const unsigned long long* __restrict__ seed, const int* __restrict__ counter,
           int B, int V, int* __restrict__ token, float* __restrict__ logprob) {
  __shared__ Smem s;
  const int row = blockIdx.x;
  if (row >= B) return;
  const float* x = logits + (size_t)row * V;
  const float temp = temperature[row];

  // Max and argmax in one reduction: key above, inverted index below, so among equal keys the
  // lowest index wins.
  auto keyed = [](float xi, int i) {
    return ((unsigned long long)fkey(xi) << 32) | (u32)~(u32)i;
  };
  unsigned long long best = 0;
  if ((V & 3) == 0) {
    // One CTA reads the whole row: 16-byte loads, four in flight a thread, or a 128k-vocab
    // greedy step waits ~50 us on one load at a time (the order of the max does not matter).
    const float4* x4 = reinterpret_cast<const float4*>(x);
#pragma unroll 4
    for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
      const float4 v = __ldg(x4 + i);
      const unsigned long long a = max(keyed(v.x, 4 * i), keyed(v.y, 4 * i + 1));
      const unsigned long long b = max(keyed(v.z, 4 * i + 2), keyed(v.w, 4 * i + 3));
      best = max(best, max(a, b));
    }
  } else {
    for (int i = threadIdx.x; i < V; i += blockDim.x) best = max(best, keyed(x[i], i));
  }
  best = block_max_u64(best, s.redu);
  const int amax = (int)~(u32)best;
  const float m = key_float((u32)(best >> 32));
  // Greedy, and rows whose max is not finite (softmax undefined; the host's would be NaN).
  const bool greedy = !(temp > 0.f) || !isfinite(m);
  const float t = greedy ? 1.f : temp;
  // Division, not a reciprocal: a tiny T sends every non-maximal weight to 0, not NaN.
  auto mass = [=](float xi) { return expf((xi - m) / t); };

  int tok = amax;
  if (!greedy) {
    u32 cut = 0;        // kept: key > cut, or key == cut at an index <= cut_idx
    int cut_idx = V;
    float above, at;
    const int k = top_k[row];
    if (k > 0 && k < V) {
      float target = (float)k;
      cut = radix_select(x, V, 0u, [](float) { return 1.f; }, target, false, above, at, s);
    }
    const float p = top_p[row];
    if (p < 1.f) {
      float target = p;
      cut = radix_select(x, V, cut, mass, target, true, above, at, s);
      // Ties at the cut: the host's stable sort takes them in index order, so only the first
      // `need` of them stay.
      const float wt = mass(key_float(cut));
      float ties = 0.f;
      for (int i = threadIdx.x; i < V; i += blockDim.x) ties += fkey(x[i]) == cut ? 1.f : 0.f;
      ties = block_sum(ties, s.red);
      const float need = fminf(fmaxf(ceilf((target - above) / wt), 1.f), ties);
      if (need < ties) {
        const u32 c = cut;
        cut_idx = scan_pick(V, need - 0.5f,
                            [=](int i) { return fkey(x[i]) == c ? 1.f : 0.f; }, s);
      }
    }
    const u32 c = cut;
    const int ci = cut_idx;
    auto kept = [=](int i) {
      const u32 kk = fkey(x[i]);
      return kk > c || (kk == c && i <= ci) ? mass(x[i]) : 0.f;
    };
    float total = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) total += kept(i);
    total = block_sum(total, s.red);
    const unsigned long long sd = seed[row];
    const U4 r = philox4x32_10(U4{(u32)counter[row], 0u, 0u, 0u}, (u32)sd, (u32)(sd >> 32));
    const float u = (float)(r.x >> 8) * (1.f / 16777216.f);  // [0, 1), 24 bits
    tok = scan_pick(V, u * total, kept, s);
  }
  if (logprob != nullptr) {
    float sum = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += mass(x[i]);
    sum = block_sum(sum, s.red);
    if (threadIdx.x == 0) logprob[row] = (x[tok] - m) / t - logf(sum);
  }
  if (threadIdx.x == 0) token[row] = tok;
}

extern "C" __global__ void ban_tokens_f32(float* __restrict__ logits,
                                          const unsigned* __restrict__ allowed, int B, int V) {
  const int words = (V + 31) >> 5;
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  const int row = blockIdx.y;
  if (row >= B || w >= words) return;
  const unsigned bits = allowed[(size_t)row * words + w];
  if (bits == 0xffffffffu) return;   // all allowed: nothing to write (most of a free row)
  float* x = logits + (size_t)row * V + (size_t)w * 32;
  const int n = min(32, V - w * 32);
  for (int j = 0; j < n; ++j)
    if (!((bits >> j) & 1u)) x[j] = -INFINITY;
}
