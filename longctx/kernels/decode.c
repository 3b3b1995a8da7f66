/* Decode-step kernels for x86-64 CPUs with AVX2, FMA and F16C (built and loaded by longctx/kernels, wrapped
by longctx/infer/native.py).

A decode step is memory-bound: it streams every weight matrix and the whole KV cache once per token, doing
two flops per value read. torch's CPU paths for these shapes read well under the machine's bandwidth on a
2-core AMD EPYC whose plain reads reach ~39 GB/s: MKL's fp32 matrix-vector product ~14 GB/s, oneDNN's
~21 GB/s, the flash-attention kernel with one query ~23 GB/s. The plain streaming loops below read ~37 GB/s
(matrix-vector) and ~40 GB/s (attention over an fp32 cache at 4096 tokens):

  lc_linear            y = x W^T + b for a few rows x (a matrix-vector product per row; W read once)
  lc_decode_attention  one query per head over S cached keys/values stored as fp32, fp16 or bf16
                       (16-bit caches are widened in registers: half the bytes read, no fp32 copy)
(RMSNorm of a decode step's few rows is fused.c's lc_rms_norm_fwd: torch's takes ~20 us of dispatch for
512 numbers, 17 times per token on an 8-layer model.)

Threads: OpenMP, i.e. torch's own libgomp pool (same soname, loaded once per process), with the thread
count passed in by the caller (torch.get_num_threads()). No -ffast-math: gcc 12 links crtfastmath.o into
shared objects, which would turn on flush-to-zero for the whole process; exp is a polynomial written here.
*/
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define KV_F32 0
#define KV_F16 1
#define KV_BF16 2

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

/* One query over keys/values [start, S) of one head: scores into s[], softmax, weighted sum of values.
   Two passes over memory (keys, then values), with the S scores in between in a scratch row (S floats:
   L2-resident at the lengths where it matters). hd is a multiple of 8. */
#define DEFINE_HEAD(NAME, LOAD, ESIZE)                                                                       \
  static void NAME(const float *q, const void *k, const void *v, float *out, float *s, int64_t start,     \
                   int64_t S, int64_t hd, float scale, float slope) {                                      \
    float m = -INFINITY;                                                                                    \
    for (int64_t j = start; j < S; j++) {                                                                   \
      const char *kj = (const char *)k + j * hd * ESIZE;                                                    \
      __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();                                              \
      int64_t c = 0;                                                                                        \
      for (; c + 16 <= hd; c += 16) {                                                                       \
        a = _mm256_fmadd_ps(LOAD(kj, c), _mm256_loadu_ps(q + c), a);                                       \
        b = _mm256_fmadd_ps(LOAD(kj, c + 8), _mm256_loadu_ps(q + c + 8), b);                               \
      }                                                                                                     \
      if (c < hd) a = _mm256_fmadd_ps(LOAD(kj, c), _mm256_loadu_ps(q + c), a);                             \
      float x = hsum8(_mm256_add_ps(a, b)) * scale - slope * (float)(S - 1 - j);                            \
      s[j] = x;                                                                                             \
      m = x > m ? x : m;                                                                                    \
    }                                                                                                       \
    __m256 tot8 = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);                                              \
    int64_t j = start;                                                                                      \
    for (; j + 8 <= S; j += 8) {                                                                            \
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));                                           \
      _mm256_storeu_ps(s + j, e);                                                                           \
      tot8 = _mm256_add_ps(tot8, e);                                                                        \
    }                                                                                                       \
    float tot = hsum8(tot8);                                                                                \
    for (; j < S; j++) {                                                                                    \
      float buf[8] = {s[j] - m};                                                                            \
      float e[8];                                                                                           \
      _mm256_storeu_ps(e, exp8(_mm256_loadu_ps(buf)));                                                      \
      s[j] = e[0];                                                                                          \
      tot += e[0];                                                                                          \
    }                                                                                                       \
    __m256 inv = _mm256_set1_ps(1.0f / tot);                                                                \
    /* the value pass keeps 8 accumulators (64 dims) in registers; wider heads take several sweeps */     \
    for (int64_t c0 = 0; c0 < hd; c0 += 64) {                                                              \
      int64_t nv = (hd - c0) / 8 < 8 ? (hd - c0) / 8 : 8;                                                   \
      __m256 acc[8];                                                                                        \
      for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();                                            \
      for (int64_t jj = start; jj < S; jj++) {                                                              \
        const char *vj = (const char *)v + jj * hd * ESIZE;                                                 \
        __m256 p = _mm256_set1_ps(s[jj]);                                                                   \
        for (int i = 0; i < nv; i++) acc[i] = _mm256_fmadd_ps(LOAD(vj, c0 + 8 * i), p, acc[i]);           \
      }                                                                                                     \
      for (int i = 0; i < nv; i++) _mm256_storeu_ps(out + c0 + 8 * i, _mm256_mul_ps(acc[i], inv));        \
    }                                                                                                       \
  }

DEFINE_HEAD(head_f32, load_f32, 4)
DEFINE_HEAD(head_f16, load_f16, 2)
DEFINE_HEAD(head_bf16, load_bf16, 2)

/* q, out: (B, Hkv * G, hd) contiguous fp32. Key/value element (b, h, j, c) sits at b * bstride + h * hstride
   + j * hd + c (in elements of the cache's type `kind`). starts[b]: the first visible key of row b (leading
   padding), or NULL for 0. slopes[Hkv * G]: ALiBi slopes (bias -slope * distance), or NULL. work: scratch
   of B * Hkv * G * S floats. Query head h reads key/value head h / G (grouped-query attention). */
void lc_decode_attention(const float *q, const void *k, const void *v, float *out, float *work, int64_t B,
                         int64_t Hkv, int64_t G, int64_t S, int64_t hd, int64_t bstride, int64_t hstride,
                         int kind, const int64_t *starts, const float *slopes, float scale, int nthreads) {
  int64_t H = Hkv * G, esize = kind == KV_F32 ? 4 : 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t bh = 0; bh < B * H; bh++) {
    int64_t b = bh / H, h = bh % H;
    int64_t start = starts ? starts[b] : 0;
    if (start > S - 1) start = S - 1; /* a row of padding only: see the last key rather than nothing */
    const char *kh = (const char *)k + (b * bstride + (h / G) * hstride) * esize;
    const char *vh = (const char *)v + (b * bstride + (h / G) * hstride) * esize;
    float slope = slopes ? slopes[h] : 0.0f;
    const float *qh = q + bh * hd;
    float *oh = out + bh * hd, *s = work + bh * S;
    if (kind == KV_F32)
      head_f32(qh, kh, vh, oh, s, start, S, hd, scale, slope);
    else if (kind == KV_F16)
      head_f16(qh, kh, vh, oh, s, start, S, hd, scale, slope);
    else
      head_bf16(qh, kh, vh, oh, s, start, S, hd, scale, slope);
  }
}
