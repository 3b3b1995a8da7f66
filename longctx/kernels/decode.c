/* Decode-step kernels for x86-64 CPUs with AVX2, FMA and F16C (built and loaded by longctx/kernels, wrapped
by longctx/infer/native.py).

A decode step is memory-bound: it streams every weight matrix and the whole KV cache once per token, doing
two flops per value read. torch's CPU paths for these shapes read well under the machine's bandwidth on a
2-core AMD EPYC whose plain reads reach ~39 GB/s: MKL's fp32 matrix-vector product ~14 GB/s, oneDNN's
~21 GB/s, the flash-attention kernel with one query ~23 GB/s. The plain streaming loops below read ~37 GB/s
(matrix-vector) and ~40 GB/s (attention over an fp32 cache at 4096 tokens):

  lc_linear            y = x W^T + b for a few rows x (a matrix-vector product per row; W read once)
  lc_decode_attention  one query per head over S cached keys/values stored as fp32, fp16, bf16 or int8
                       with one fp32 scale per (row, head, token) (widened in registers: a half or a
                       quarter of fp32's bytes read, no fp32 copy); optionally each head's logsumexp
(RMSNorm of a decode step's few rows is fused.c's lc_rms_norm_fwd: torch's takes ~20 us of dispatch for
512 numbers, 17 times per token on an 8-layer model.)

Threads: OpenMP, i.e. torch's own libgomp pool (same soname, loaded once per process), with the thread
count passed in by the caller (torch.get_num_threads()). No -ffast-math: gcc 12 links crtfastmath.o into
shared objects, which would turn on flush-to-zero for the whole process; exp is a polynomial written here.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define KV_F32 0
#define KV_F16 1
#define KV_BF16 2
#define KV_I8 3
static inline int64_t kv_bytes(int kind) { return kind == KV_F32 ? 4 : kind == KV_I8 ? 1 : 2; }

/* ---- y (M, N) = x (M, K) @ W (N, K)^T + bias (N) ------------------------------------------------------
   Eight rows of W at a time: eight independent FMA chains hide the latency, and eight streams keep enough
   loads in flight (measured on the 8-layer `base` weights: 4 rows 31-34 GB/s, 8 rows ~37 GB/s). Each block
   of W is read from memory once and reused from L1/L2 for every row of x. */
#define ROWS 8
static void dot_rows(const float *x, const float *const w[ROWS], int64_t K, float out[ROWS]) {
  __m256 a[ROWS];
  for (int i = 0; i < ROWS; i++) a[i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv = _mm256_loadu_ps(x + k);
    for (int i = 0; i < ROWS; i++) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(w[i] + k), xv, a[i]);
  }
  for (int i = 0; i < ROWS; i++) {
    out[i] = hsum8(a[i]);
    for (int64_t kk = k; kk < K; kk++) out[i] += w[i][kk] * x[kk];
  }
}

void lc_linear(const float *x, const float *W, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
               int nthreads) {
  int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t blk = 0; blk < blocks; blk++) {
    int64_t n = ROWS * blk, r = N - n < ROWS ? N - n : ROWS;
    /* a short last block repeats its last row instead of reading past W */
    const float *w[ROWS];
    for (int i = 0; i < ROWS; i++) w[i] = W + (n + (i < r ? i : r - 1)) * K;
    for (int64_t m = 0; m < M; m++) {
      float out[ROWS];
      dot_rows(x + m * K, w, K, out);
      for (int i = 0; i < r; i++) y[m * N + n + i] = out[i] + (bias ? bias[n + i] : 0.0f);
    }
  }
}

/* ---- loading 8 cached values as fp32 ------------------------------------------------------------------ */
static inline __m256 load_f32(const void *p, int64_t i) { return _mm256_loadu_ps((const float *)p + i); }
static inline __m256 load_f16(const void *p, int64_t i) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
}
static inline __m256 load_bf16(const void *p, int64_t i) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline __m256 load_i8(const void *p, int64_t i) { /* before its token's scale */
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)p + i))));
}

/* ---- one query per head over a long cache ---------------------------------------------------------------
   The work is split into units of (row b, key/value head, a range of keys), and a unit runs every query
   head of its group (grouped-query attention: G heads read one key/value head) over its range, loading and
   widening each key and value once for all of them. Why: one unit per query head widened each key/value
   head G times and left threads idle when the heads did not divide evenly among them. SmolLM2's shapes (9
   query heads on 3 key/value heads, an fp16 cache of 4096 tokens, 30 layers, 2 threads, a 2-core AMD
   EPYC Zen 3 whose plain reads reach ~33 GB/s; a scratch harness loading both builds into one process,
   interleaved): 12.1 -> 22.1 GB/s. With a few ranges per head every thread gets the same share, and each
   range's partial softmax (max m, sum l, unnormalised output) is merged exactly afterwards:
   o = sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) l_i. */

/* Up to 3 query heads of one group at a time (NG, a compile-time constant in each instantiation below; the
   arrays are sized 3, not NG, which would make them variable-length and keep them in memory), so
   that every key and value is loaded and widened once for all of them and their accumulators stay in
   registers: scores take 4 keys x NG heads (12 of AVX2's 16 registers at NG = 3), values 32 dims x NG
   heads. Rows past the range's end are clamped to its last row (read, never stored). */
/* keys are prefetched this many rows ahead of the score pass (4 KiB of an fp16 head of 64: +5%) */
#define PREFETCH_ROWS 32
static inline __attribute__((always_inline)) __m256 load_kv(const char *row, int64_t c, const int kind) {
  return kind == KV_F32    ? load_f32(row, c)
         : kind == KV_F16  ? load_f16(row, c)
         : kind == KV_BF16 ? load_bf16(row, c)
                           : load_i8(row, c);
}

/* scores s[g * S + j] = scale q_g . k_j - slope_g (S - 1 - j) for j in [j0, j1); m[g] = their max (int8
   keys: times the key's scale ks[j]). With v, the same rows of values are prefetched into L2 meanwhile: two
   streams in flight instead of one (SmolLM2's shapes at 4096, Zen 3: +8-10%), and the value pass finds them
   there. */
static inline __attribute__((always_inline)) void group_scores(const float *q, const char *k, const float *ks,
                                                               const char *v, const int kind, int64_t j0,
                                                               int64_t j1, int64_t S, int64_t hd, float scale,
                                                               const float *slopes, float *s, float *m,
                                                               const int NG) {
  const int64_t rb = hd * kv_bytes(kind);
  __m128 mx[3];
  for (int g = 0; g < NG; g++) mx[g] = _mm_set1_ps(-INFINITY);
  for (int64_t j = j0; j < j1; j += 4) {
    const int64_t nr = j1 - j < 4 ? j1 - j : 4;
    const char *row[4];
    for (int r = 0; r < 4; r++) row[r] = k + (j + (r < nr ? r : nr - 1)) * rb;
    for (int64_t b = 0; b < 4 * rb; b += 64) _mm_prefetch(k + (j + PREFETCH_ROWS) * rb + b, _MM_HINT_T0);
    if (v)
      for (int64_t b = 0; b < 4 * rb; b += 64) _mm_prefetch(v + j * rb + b, _MM_HINT_T1);
    __m256 a[3][4];
    for (int g = 0; g < NG; g++)
      for (int r = 0; r < 4; r++) a[g][r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < hd; c += 8) { /* 12 accumulators, 3 of q, 1 of k: all 16 registers, no spill */
      __m256 qv[3];
      for (int g = 0; g < NG; g++) qv[g] = _mm256_loadu_ps(q + g * hd + c);
      for (int r = 0; r < 4; r++) {
        __m256 kv = load_kv(row[r], c, kind);
        for (int g = 0; g < NG; g++) a[g][r] = _mm256_fmadd_ps(kv, qv[g], a[g][r]);
      }
    }
    const __m128 dist = _mm_sub_ps(_mm_set1_ps((float)(S - 1 - j)), _mm_setr_ps(0, 1, 2, 3));
    __m128 sc = _mm_set1_ps(scale);
    if (kind == KV_I8)
      sc = _mm_mul_ps(sc, _mm_setr_ps(ks[j], ks[j + (nr > 1)], ks[j + (nr > 2 ? 2 : nr - 1)],
                                      ks[j + (nr > 3 ? 3 : nr - 1)]));
    for (int g = 0; g < NG; g++) { /* 4 dot products: an hadd tree, then the two 128-bit halves */
      __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[g][0], a[g][1]), _mm256_hadd_ps(a[g][2], a[g][3]));
      __m128 x = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), sc);
      x = _mm_fnmadd_ps(_mm_set1_ps(slopes ? slopes[g] : 0.0f), dist, x);
      if (nr == 4) {
        _mm_storeu_ps(s + g * S + j, x);
      } else {
        float tmp[4];
        _mm_storeu_ps(tmp, x);
        memcpy(s + g * S + j, tmp, nr * sizeof(float));
        x = _mm_blendv_ps(_mm_set1_ps(-INFINITY), x, _mm_cmplt_ps(_mm_setr_ps(0, 1, 2, 3), _mm_set1_ps((float)nr)));
      }
      mx[g] = _mm_max_ps(mx[g], x);
    }
  }
  for (int g = 0; g < NG; g++) {
    __m128 t = _mm_max_ps(mx[g], _mm_movehl_ps(mx[g], mx[g]));
    m[g] = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
  }
}

/* o_g[c] = sum_j p_g[j] v_j[c] over [j0, j1), p_g = s + g * S (int8 values: times the value's scale
   vs[j]); o_g = o + g * ostride */
static inline __attribute__((always_inline)) void group_values(const float *s, const char *v, const float *vs,
                                                               const int kind, int64_t j0, int64_t j1, int64_t S,
                                                               int64_t hd, float *o, int64_t ostride,
                                                               const int NG) {
  const int64_t rb = hd * kv_bytes(kind);
  int64_t c0 = 0;
  for (; c0 + 32 <= hd; c0 += 32) {
    __m256 acc[3][4];
    for (int g = 0; g < NG; g++)
      for (int i = 0; i < 4; i++) acc[g][i] = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; j++) {
      if (c0 == 0)
        for (int64_t b = 0; b < rb; b += 64) _mm_prefetch(v + (j + PREFETCH_ROWS) * rb + b, _MM_HINT_T0);
      __m256 p[3]; /* 12 accumulators, 3 weights, 1 value: all 16 registers */
      for (int g = 0; g < NG; g++) p[g] = _mm256_set1_ps(s[g * S + j] * (kind == KV_I8 ? vs[j] : 1.0f));
      for (int i = 0; i < 4; i++) {
        __m256 vv = load_kv(v + j * rb, c0 + 8 * i, kind);
        for (int g = 0; g < NG; g++) acc[g][i] = _mm256_fmadd_ps(vv, p[g], acc[g][i]);
      }
    }
    for (int g = 0; g < NG; g++)
      for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + g * ostride + c0 + 8 * i, acc[g][i]);
  }
  for (; c0 < hd; c0 += 8) { /* the rest of a head that is not a multiple of 32 wide */
    __m256 acc[3];
    for (int g = 0; g < NG; g++) acc[g] = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; j++) {
      __m256 vv = load_kv(v + j * rb, c0, kind);
      const float w = kind == KV_I8 ? vs[j] : 1.0f;
      for (int g = 0; g < NG; g++) acc[g] = _mm256_fmadd_ps(vv, _mm256_set1_ps(s[g * S + j] * w), acc[g]);
    }
    for (int g = 0; g < NG; g++) _mm256_storeu_ps(o + g * ostride + c0, acc[g]);
  }
}

static inline float exp1(float x) {
  float buf[8] = {x}, e[8];
  _mm256_storeu_ps(e, exp8(_mm256_loadu_ps(buf)));
  return e[0];
}

/* the two passes of NG query heads, one instantiation per (pass, cache type, NG) */
#define DEFINE_GROUP(KIND, NAME, NG)                                                                        \
  static void scores_##NAME(const float *q, const char *k, const float *ks, const char *v, int64_t j0,     \
                            int64_t j1, int64_t S, int64_t hd, float scale, const float *slopes, float *s,   \
                            float *m) {                                                                     \
    group_scores(q, k, ks, v, KIND, j0, j1, S, hd, scale, slopes, s, m, NG);                                \
  }                                                                                                         \
  static void values_##NAME(const float *s, const char *v, const float *vs, int64_t j0, int64_t j1,        \
                            int64_t S, int64_t hd, float *o, int64_t ostride) {                             \
    group_values(s, v, vs, KIND, j0, j1, S, hd, o, ostride, NG);                                            \
  }
#define DEFINE_KIND(KIND, NAME)                                                                             \
  DEFINE_GROUP(KIND, NAME##_1, 1) DEFINE_GROUP(KIND, NAME##_2, 2) DEFINE_GROUP(KIND, NAME##_3, 3)
DEFINE_KIND(KV_F32, f32)
DEFINE_KIND(KV_F16, f16)
DEFINE_KIND(KV_BF16, bf16)
DEFINE_KIND(KV_I8, i8)
typedef void (*scores_fn)(const float *, const char *, const float *, const char *, int64_t, int64_t, int64_t,
                          int64_t, float, const float *, float *, float *);
typedef void (*values_fn)(const float *, const char *, const float *, int64_t, int64_t, int64_t, int64_t,
                          float *, int64_t);
/* [cache kind][NG - 1] */
#define BY_NG(PASS, NAME) {PASS##_##NAME##_1, PASS##_##NAME##_2, PASS##_##NAME##_3}
static const scores_fn SCORES[4][3] = {BY_NG(scores, f32), BY_NG(scores, f16), BY_NG(scores, bf16),
                                       BY_NG(scores, i8)};
static const values_fn VALUES[4][3] = {BY_NG(values, f32), BY_NG(values, f16), BY_NG(values, bf16),
                                       BY_NG(values, i8)};

/* G query heads q (G, hd) over keys/values [j0, j1) (not empty) of one key/value head k, v (rows of hd in
   the cache's type), in groups of up to 3. Scores of head g go to s[g * S + j], then their exponentials;
   part[g * pstride] receives o = sum_j e^(s_j - m) v_j (unnormalised, hd floats), then m = max s and
   l = sum e^(s_j - m). */
static void unit_attention(const float *q, int64_t G, const char *k, const float *ks, const char *v,
                           const float *vs, int kind, int64_t j0, int64_t j1, int64_t S, int64_t hd, float scale,
                           const float *slopes, float *s, float *part, int64_t pstride) {
  for (int64_t g0 = 0; g0 < G; g0 += 3) {
    const int ng = G - g0 < 3 ? (int)(G - g0) : 3;
    float m[3];
    /* the first group's score pass prefetches the values; later groups find them in L2 */
    SCORES[kind][ng - 1](q + g0 * hd, k, ks, g0 ? NULL : v, j0, j1, S, hd, scale, slopes ? slopes + g0 : NULL,
                         s + g0 * S, m);
    for (int g = 0; g < ng; g++) { /* exponentials and their sum */
      float *sg = s + (g0 + g) * S, *p = part + (g0 + g) * pstride;
      __m256 tot8 = _mm256_setzero_ps(), mv = _mm256_set1_ps(m[g]);
      int64_t j = j0;
      for (; j + 8 <= j1; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), mv));
        _mm256_storeu_ps(sg + j, e);
        tot8 = _mm256_add_ps(tot8, e);
      }
      float tot = hsum8(tot8);
      for (; j < j1; j++) tot += sg[j] = exp1(sg[j] - m[g]);
      p[hd] = m[g], p[hd + 1] = tot;
    }
    VALUES[kind][ng - 1](s + g0 * S, v, vs, j0, j1, S, hd, part + g0 * pstride, pstride);
  }
}

/* ranges per key/value head: no longer than RANGE_BYTES of keys and values (so that a range stays in L2
   between its passes and across its heads: at 16384 tokens, 4 ranges of 4096 keys, 1 MiB each, read at 15.4
   GB/s, and 16 of 1024 at ~23), enough of them for every thread to get the same number of units (at least
   4 each), and none shorter than MIN_RANGE keys (below that the merge costs more than the balance gains) */
#define RANGE_BYTES (256 * 1024)
#define MIN_RANGE 256
static int64_t key_ranges(int64_t heads, int64_t S, int64_t row_bytes, int nthreads) {
  int64_t longest = RANGE_BYTES / (2 * row_bytes) > MIN_RANGE ? RANGE_BYTES / (2 * row_bytes) : MIN_RANGE;
  int64_t n = (S + longest - 1) / longest, cap = S / MIN_RANGE > n ? S / MIN_RANGE : n;
  while (n < cap && (heads * n < 4 * nthreads || (heads * n) % nthreads)) n++;
  return n;
}

/* q, out: (B, Hkv * G, hd) contiguous fp32. Key/value element (b, h, j, c) sits at b * bstride + h * hstride
   + j * hd + c (in elements of the cache's type `kind`). starts[b]: the first visible key of row b (leading
   padding), or NULL for 0. slopes[Hkv * G]: ALiBi slopes (bias -slope * distance), or NULL. work: scratch
   of B * Hkv * G * S floats. Query head h reads key/value head h / G (grouped-query attention). int8 (kind
   KV_I8): ks, vs hold each key's and value's scale, element (b, h, j) at (b * bstride + h * hstride) / hd + j
   (the cache's shape with a last dimension of 1); else NULL. */
void lc_decode_attention(const float *q, const void *k, const void *v, const float *ks, const float *vs, float *out,
                         float *lse, float *work, int64_t B, int64_t Hkv, int64_t G, int64_t S, int64_t hd, int64_t bstride,
                         int64_t hstride, int kind, const int64_t *starts, const float *slopes, float scale,
                         int nthreads) {
  int64_t H = Hkv * G, esize = kv_bytes(kind), n = key_ranges(B * Hkv, S, hd * esize, nthreads);
  /* per query head and range: hd outputs, then m and l */
  float *part = malloc(B * H * n * (hd + 2) * sizeof(float));
  if (!part) { /* a failed malloc of a few KB: say so in the numbers rather than return stale ones */
    for (int64_t i = 0; i < B * H * hd; i++) out[i] = NAN;
    return;
  }
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(static)
    for (int64_t u = 0; u < B * Hkv * n; u++) {
      int64_t b = u / (Hkv * n), h = u / n % Hkv, i = u % n;
      int64_t start = starts ? starts[b] : 0;
      if (start > S - 1) start = S - 1; /* a row of padding only: see the last key rather than nothing */
      int64_t len = (S - start + n - 1) / n, j0 = start + i * len, j1 = j0 + len < S ? j0 + len : S;
      const char *kh = (const char *)k + (b * bstride + h * hstride) * esize;
      const char *vh = (const char *)v + (b * bstride + h * hstride) * esize;
      float *p = part + ((b * H + h * G) * n + i) * (hd + 2);
      if (j0 >= j1) { /* more ranges than visible keys: empty parts */
        for (int64_t g = 0; g < G; g++) {
          memset(p + g * n * (hd + 2), 0, hd * sizeof(float));
          p[g * n * (hd + 2) + hd] = -INFINITY, p[g * n * (hd + 2) + hd + 1] = 0.0f;
        }
        continue;
      }
      const int64_t so = (b * bstride + h * hstride) / hd; /* the scales' offset (int8) */
      unit_attention(q + (b * H + h * G) * hd, G, kh, ks ? ks + so : NULL, vh, vs ? vs + so : NULL, kind, j0, j1, S,
                     hd, scale, slopes ? slopes + h * G : NULL, work + (b * H + h * G) * S, p, n * (hd + 2));
    }
#pragma omp for schedule(static)
    for (int64_t qh = 0; qh < B * H; qh++) {
      const float *p = part + qh * n * (hd + 2);
      float M = -INFINITY, L = 0.0f, w[n];
      for (int64_t i = 0; i < n; i++) M = p[i * (hd + 2) + hd] > M ? p[i * (hd + 2) + hd] : M;
      for (int64_t i = 0; i < n; i++) {
        const float *pi = p + i * (hd + 2);
        w[i] = pi[hd] == -INFINITY ? 0.0f : exp1(pi[hd] - M);
        L += w[i] * pi[hd + 1];
      }
      for (int64_t c = 0; c < hd; c++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < n; i++) acc += w[i] * p[i * (hd + 2) + c];
        out[qh * hd + c] = acc / L;
      }
      if (lse) lse[qh] = M + logf(L); /* the caller merges this softmax with others over other keys */
    }
  }
  free(part);
}
