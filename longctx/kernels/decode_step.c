/* A whole decode step of a llama-style model in one call (wrapped by longctx/infer/fused_decode.py).

A decode step of SmolLM2-135M (30 layers) ran ~40 torch ops and ctypes calls per layer from Python; at
~15 us each that is ~20 ms of dispatch per token against ~6 ms of actual memory traffic for int4 weights
(measured: 33.8 tok/s with the per-op path where the weights alone allow ~180). Here one call runs every
layer: RMSNorm -> q, k, v -> RoPE -> append k, v to the cache -> attention over the cache -> o_proj and
residual -> RMSNorm -> gate, up -> SwiGLU -> down and residual, on fp32 activations, calling the same
kernels the per-op path uses (lc_linear*, lc_decode_attention, lc_rms_norm_fwd, lc_swiglu_fwd), so both
paths compute the same numbers up to the order of a few additions.

Weights per matrix: fp32, fp16 or bf16 (widened in registers, half the bytes; 16 per AVX-512 register where
the build has it), or ggml blocks Q8_0 / Q4_0 / Q4_1 in quant.c's layout. The KV cache: fp32, fp16, bf16,
or int8 with a scale per token (Int8KVCache), laid out (B, K, S, hd) per layer with the strides given.
RoPE: HF's half-split layout on the first `rot` dims of each head (cos/sin per row, already scaled by the
attention factor, as longctx.positions computes them).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* the kernels of the other files */
void lc_linear(const float *x, const float *W, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
               int nthreads);
void lc_linear_q(const float *x, const uint8_t *W, int kind, const float *bias, float *y, int64_t M, int64_t N,
                 int64_t K, int nthreads);
void lc_decode_attention(const float *q, const void *k, const void *v, const float *ks, const float *vs, float *out,
                         float *lse, float *work, int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t hd, int64_t bstride,
                         int64_t hstride, int kind, const int64_t *starts, const float *slopes, float scale,
                         int nthreads);
void lc_rms_norm_fwd(const float *x, const float *w, float *y, float *rstd, int64_t M, int64_t D, float eps,
                     int nthreads);
void lc_swiglu_fwd(const float *a, const float *b, float *h, int64_t n, int nthreads);

/* matrix kinds */
#define W_F32 0
#define W_F16 1
#define W_BF16 2
#define W_Q8_0 10 /* + quant.c's kind */

typedef struct {
  int64_t kind;
  const void *w;
  const float *bias; /* or NULL */
  int64_t n, k;
} LcMat;

typedef struct {
  const float *attn_norm, *mlp_norm;
  LcMat q, k, v, o, gate, up, down;
  void *kc, *vc; /* this layer's cache: element (b, h, s, c) at b * bstride + h * hstride + s * hd + c */
  float *ks, *vs; /* an int8 cache's scales: (b, h, s) at (b * bstride + h * hstride) / hd + s; else NULL */
} LcLayer;

typedef struct {
  int64_t n_layer, d, H, KV, hd, rot, ff, bstride, hstride, kv_kind;
  float eps;
} LcDims;

/* A context method's regions for this step's query (longctx.attention.context_methods): region r reads the
   keys [a[r], b[r]) of key store store[r] with the query rotated by qcos/qsin[r]; store s holds every key
   rotated as its map says, and the new key enters it rotated by kcos/ksin[s] (at layer l: stores[s *
   n_layer + l], laid out as the cache). The raw key goes into the cache as ever (kc). */
typedef struct {
  int64_t n, n_store;
  const int64_t *a, *b, *store;
  const float *qcos, *qsin, *kcos, *ksin; /* (n, rot), (n_store, rot) */
  void *const *stores;
} LcRegions;

/* ---- y (M, N) = x W^T + b for 16-bit W, widened in registers (half the bytes of fp32) ----------------- */
static inline __m256 load16(const uint16_t *p, int bf16) {
  return bf16 ? ps_from_bf16x8(p) : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
#ifdef __AVX512F__
static inline __m512 load16x16(const uint16_t *p, int bf16) {
  return bf16 ? ps_from_bf16x16(p) : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
#endif
static inline float widen1(uint16_t h, int bf16) { return bf16 ? f32_from_bf16(h) : _cvtsh_ss(h); }

#ifdef __AVX512F__
/* One row at a time, 16 weights per register, front to back: each thread reads its share of W as one
   sequential stream (the AVX2 loop's reason, below). SmolLM2's 30 layers of bf16 matrices and its LM head,
   2 threads, AMD EPYC Zen 5, a scratch harness with both loops: 39 GB/s for eight rows at a time with a
   prefetch per cache line (what this was, from Zen 4), 46 GB/s for this; splitting x into even and odd
   columns (the AVX2 trick) read the same 46, two rows at a time 35. */
void lc_linear_16(const float *x, const uint16_t *W, int bf16, const float *bias, float *y, int64_t M, int64_t N,
                  int64_t K, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t n = 0; n < N; n++)
    for (int64_t m = 0; m < M; m++) {
      const uint16_t *w = W + n * K;
      const float *xm = x + m * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        a0 = _mm512_fmadd_ps(load16x16(w + k, bf16), _mm512_loadu_ps(xm + k), a0);
        a1 = _mm512_fmadd_ps(load16x16(w + k + 16, bf16), _mm512_loadu_ps(xm + k + 16), a1);
      }
      if (k + 16 <= K) a0 = _mm512_fmadd_ps(load16x16(w + k, bf16), _mm512_loadu_ps(xm + k), a0), k += 16;
      __m512 a = _mm512_add_ps(a0, a1);
      __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
      if (k + 8 <= K) h = _mm256_fmadd_ps(load16(w + k, bf16), _mm256_loadu_ps(xm + k), h), k += 8;
      float s = hsum8(h);
      for (; k < K; k++) s += widen1(w[k], bf16) * xm[k];
      y[m * N + n] = s + (bias ? bias[n] : 0.0f);
    }
}
#else
/* AVX2: one row at a time, front to back, so that each thread reads its share of W as one sequential stream
   where eight rows at a time read eight short streams of a row each: SmolLM2's 30 layers of matrices, 2
   threads, AMD EPYC Zen 3, both loops in one process: bf16 22.6 -> 28-30 GB/s, fp16 22.4 -> 27-31 (fp32
   weights went the other way, 34 -> 31: they keep decode.c's eight rows). x stays in L1. No software
   prefetch: the hardware's stream prefetcher keeps up with one light loop per core, and a prefetch per cache
   line cost more than it gained (same harness: fp16 26.6 -> 30.0 GB/s, bf16 28.6 -> 29.6 without; a plain
   read of 128 MiB, 2 threads: 42.4 GB/s without, 35.7-40.8 with one 1-4 KiB ahead). The quantized kernels
   do more work per byte and keep theirs (quant.c).
   bf16 reads 16 weights per 256-bit load with no widening: the high half of each 32-bit lane is an odd weight
   as an fp32 number once the low half is masked off, the low half shifted up the even one, against x split
   into even and odd columns once per call (28-30 GB/s against 26-27 widening 8 at a time). */
#define SPLIT 1            /* dot_row16's bf16 with x split (else: 0 fp16, 2 bf16 widened 8 at a time) */
static inline __attribute__((always_inline)) float dot_row16(const uint16_t *w, const float *x, const float *xe,
                                                             const float *xo, int64_t K, const int kind) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  const int bf16 = kind != 0;
  int64_t k = 0;
  if (kind == SPLIT) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    for (; k + 32 <= K; k += 32) {
      __m256i v = _mm256_loadu_si256((const __m256i *)(w + k)), u = _mm256_loadu_si256((const __m256i *)(w + k + 16));
      a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xe + k / 2), a0);
      a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), _mm256_loadu_ps(xo + k / 2), a1);
      a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), _mm256_loadu_ps(xe + k / 2 + 8), a2);
      a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(u, high)), _mm256_loadu_ps(xo + k / 2 + 8), a3);
    }
  } else {
    for (; k + 32 <= K; k += 32) {
      a0 = _mm256_fmadd_ps(load16(w + k, bf16), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(load16(w + k + 8, bf16), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(load16(w + k + 16, bf16), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(load16(w + k + 24, bf16), _mm256_loadu_ps(x + k + 24), a3);
    }
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load16(w + k, bf16), _mm256_loadu_ps(x + k), a0);
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; k++) s += widen1(w[k], bf16) * x[k];
  return s;
}
void lc_linear_16(const float *x, const uint16_t *W, int bf16, const float *bias, float *y, int64_t M, int64_t N,
                  int64_t K, int nthreads) {
  /* bf16: the columns of x's blocks of 32 split into even (xe) and odd (xo), M x K / 2 each */
  int64_t half = K / 32 * 16;
  float *xe = bf16 ? malloc(sizeof(float) * (2 * M * half + 1)) : NULL, *xo = xe ? xe + M * half : NULL;
  for (int64_t m = 0; xe && m < M; m++)
    for (int64_t c = 0; c < half; c += 8) {
      const float *xm = x + m * K + 2 * c;
      __m256 x0 = _mm256_loadu_ps(xm), x1 = _mm256_loadu_ps(xm + 8);
      /* a 128-bit half of a 256-bit load of weights holds 8 of them: pair x's halves the same way, then pick */
      __m256 lo = _mm256_permute2f128_ps(x0, x1, 0x20), hi = _mm256_permute2f128_ps(x0, x1, 0x31);
      _mm256_storeu_ps(xe + m * half + c, _mm256_shuffle_ps(lo, hi, 0x88));
      _mm256_storeu_ps(xo + m * half + c, _mm256_shuffle_ps(lo, hi, 0xDD));
    }
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t n = 0; n < N; n++)
    for (int64_t m = 0; m < M; m++) {
      const uint16_t *w = W + n * K;
      const float *xm = x + m * K;
      float s = !bf16 ? dot_row16(w, xm, NULL, NULL, K, 0)
                : xe  ? dot_row16(w, xm, xe + m * half, xo + m * half, K, SPLIT)
                      : dot_row16(w, xm, NULL, NULL, K, 2); /* no memory for the split */
      y[m * N + n] = s + (bias ? bias[n] : 0.0f);
    }
  free(xe);
}
#endif

static void matvec(const LcMat *m, const float *x, float *y, int64_t M, int nt) {
  if (m->kind == W_F32)
    lc_linear(x, (const float *)m->w, m->bias, y, M, m->n, m->k, nt);
  else if (m->kind == W_F16 || m->kind == W_BF16)
    lc_linear_16(x, (const uint16_t *)m->w, m->kind == W_BF16, m->bias, y, M, m->n, m->k, nt);
  else
    lc_linear_q(x, (const uint8_t *)m->w, (int)(m->kind - W_Q8_0), m->bias, y, M, m->n, m->k, nt);
}

/* HF's rotate_half on the first rot dims of each of `heads` vectors of hd: x1 = x[:rot/2], x2 = x[rot/2:rot];
   x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin (cos/sin hold each frequency twice, as HF's do) */
static void rope(float *x, int64_t heads, int64_t hd, int64_t rot, const float *cos, const float *sin) {
  int64_t half = rot / 2;
  for (int64_t h = 0; h < heads; h++) {
    float *v = x + h * hd;
    for (int64_t i = 0; i < half; i++) {
      float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

/* torch's float -> bfloat16: round to nearest even (NaN stays NaN) */
/* one key or value row into the cache; int8 as longctx.infer.cache.Int8KVCache.quantize: scale = max(|x|,
   1e-8) / 127, q = round-half-even(x / scale) clamped to +-127 */
static void store_row(void *cache, float *scales, int64_t kind, int64_t offset, const float *src, int64_t n) {
  if (kind == 3) {
    float amax = 1e-8f;
    for (int64_t i = 0; i < n; i++) amax = fabsf(src[i]) > amax ? fabsf(src[i]) : amax;
    float scale = amax / 127.0f;
    int8_t *dst = (int8_t *)cache + offset;
    for (int64_t i = 0; i < n; i++) {
      float r = nearbyintf(src[i] / scale); /* the default rounding mode: to nearest, ties to even */
      dst[i] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
    }
    scales[offset / n] = scale;
  } else if (kind == 0) {
    memcpy((float *)cache + offset, src, n * sizeof(float));
  } else if (kind == 1) {
    uint16_t *dst = (uint16_t *)cache + offset;
    for (int64_t i = 0; i < n; i++) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
  } else {
    uint16_t *dst = (uint16_t *)cache + offset;
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_from_f32(src[i]);
  }
}

/* Attention of the step's queries as a context method computes it: each region the decode kernel over its
   range of its store's keys (and the cache's values), merged per head by the regions' logsumexps. The new
   token's key is rotated into every store first. part: R->n * B * H * (hd + 1) + B * (H + KV) * hd floats. */
static void region_attention(const LcDims *D, const LcRegions *R, int64_t l, const LcLayer *L, const float *q,
                             const float *k, float *att, float *part, float *scores, int64_t B, int64_t slot,
                             float scale, int nt) {
  int64_t H = D->H, KV = D->KV, hd = D->hd, esize = D->kv_kind == 0 ? 4 : 2;
  float *outs = part, *lses = outs + R->n * B * H * hd, *qr = lses + R->n * B * H, *kr = qr + B * H * hd;
  for (int64_t s = 0; s < R->n_store; s++) {
    /* the key as the cache stores it (rounded to a 16-bit cache's kind), then rotated: the per-op path rotates
       the keys the cache returns, so each store is a function of the cache's raw keys either way */
    for (int64_t i = 0; i < B * KV * hd; i++)
      kr[i] = D->kv_kind == 1 ? _cvtsh_ss(_cvtss_sh(k[i], _MM_FROUND_TO_NEAREST_INT))
              : D->kv_kind == 2 ? widen1(bf16_from_f32(k[i]), 1) : k[i];
    for (int64_t b = 0; b < B; b++) rope(kr + b * KV * hd, KV, hd, D->rot, R->kcos + s * D->rot, R->ksin + s * D->rot);
    for (int64_t b = 0; b < B; b++)
      for (int64_t j = 0; j < KV; j++)
        store_row(R->stores[s * D->n_layer + l], NULL, D->kv_kind, b * D->bstride + j * D->hstride + slot * hd,
                  kr + (b * KV + j) * hd, hd);
  }
  for (int64_t r = 0; r < R->n; r++) {
    memcpy(qr, q, B * H * hd * sizeof(float));
    for (int64_t b = 0; b < B; b++) rope(qr + b * H * hd, H, hd, D->rot, R->qcos + r * D->rot, R->qsin + r * D->rot);
    const char *ks = (const char *)R->stores[R->store[r] * D->n_layer + l] + R->a[r] * hd * esize;
    const char *vs = (const char *)L->vc + R->a[r] * hd * esize;
    lc_decode_attention(qr, ks, vs, NULL, NULL, outs + r * B * H * hd, lses + r * B * H, scores, B, KV, H / KV,
                        R->b[r] - R->a[r], hd, D->bstride, D->hstride, (int)D->kv_kind, NULL, NULL, scale, nt);
  }
  for (int64_t i = 0; i < B * H; i++) { /* out = sum_r e^(lse_r - M) out_r / sum_r e^(lse_r - M) */
    float M = -INFINITY, wsum = 0.0f;
    for (int64_t r = 0; r < R->n; r++) M = lses[r * B * H + i] > M ? lses[r * B * H + i] : M;
    for (int64_t c = 0; c < hd; c++) att[i * hd + c] = 0.0f;
    for (int64_t r = 0; r < R->n; r++) {
      float w = expf(lses[r * B * H + i] - M);
      wsum += w;
      for (int64_t c = 0; c < hd; c++) att[i * hd + c] += w * outs[(r * B * H + i) * hd + c];
    }
    for (int64_t c = 0; c < hd; c++) att[i * hd + c] /= wsum;
  }
}

/* x (B, d): the residual stream, updated in place through every layer (the final norm is the caller's).
   cos/sin (B, rot); slot: the cache position the new token takes (the keys [starts[b], slot] are visible);
   work: B * (2 d + 2 H hd + 2 KV hd + 2 ff) + B * H * (slot + 1) floats, and region_attention's part after
   them. regions: a context method's (the cache then holds raw keys, cos/sin are unused), or NULL. */
void lc_decode_layers(const LcDims *D, const LcLayer *layers, float *x, int64_t B, const float *cos,
                      const float *sin, int64_t slot, const int64_t *starts, const LcRegions *regions, float *work,
                      int nt) {
  int64_t d = D->d, H = D->H, KV = D->KV, hd = D->hd, ff = D->ff;
  float *h = work, *t = h + B * d, *q = t + B * d, *att = q + B * H * hd, *k = att + B * H * hd,
        *v = k + B * KV * hd, *g = v + B * KV * hd, *u = g + B * ff, *scores = u + B * ff,
        *part = scores + B * H * (slot + 1);
  float scale = 1.0f / sqrtf((float)hd);
  for (int64_t l = 0; l < D->n_layer; l++) {
    const LcLayer *L = layers + l;
    lc_rms_norm_fwd(x, L->attn_norm, h, NULL, B, d, D->eps, nt);
    matvec(&L->q, h, q, B, nt);
    matvec(&L->k, h, k, B, nt);
    matvec(&L->v, h, v, B, nt);
    for (int64_t b = 0; b < B; b++) {
      if (D->rot > 0 && !regions) {
        rope(q + b * H * hd, H, hd, D->rot, cos + b * D->rot, sin + b * D->rot);
        rope(k + b * KV * hd, KV, hd, D->rot, cos + b * D->rot, sin + b * D->rot);
      }
      for (int64_t j = 0; j < KV; j++) {
        int64_t off = b * D->bstride + j * D->hstride + slot * hd;
        store_row(L->kc, L->ks, D->kv_kind, off, k + (b * KV + j) * hd, hd);
        store_row(L->vc, L->vs, D->kv_kind, off, v + (b * KV + j) * hd, hd);
      }
    }
    if (regions)
      region_attention(D, regions, l, L, q, k, att, part, scores, B, slot, scale, nt);
    else
      lc_decode_attention(q, L->kc, L->vc, L->ks, L->vs, att, NULL, scores, B, KV, H / KV, slot + 1, hd,
                          D->bstride, D->hstride, (int)D->kv_kind, starts, NULL, scale, nt);
    matvec(&L->o, att, t, B, nt);
    for (int64_t i = 0; i < B * d; i++) x[i] += t[i];
    lc_rms_norm_fwd(x, L->mlp_norm, h, NULL, B, d, D->eps, nt);
    matvec(&L->gate, h, g, B, nt);
    matvec(&L->up, h, u, B, nt);
    lc_swiglu_fwd(g, u, g, B * ff, nt);
    matvec(&L->down, g, t, B, nt);
    for (int64_t i = 0; i < B * d; i++) x[i] += t[i];
  }
}
