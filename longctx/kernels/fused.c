/* The decoder's elementwise ops on CPU, each way in one pass over memory (wrapped by
longctx/kernels/fused.py as torch ops with their own backward, and called directly for decode steps).

torch runs these as chains of kernels, each a full pass over (tokens x width) tensors with a temporary in
between: nn.RMSNorm's backward alone is ~8 of them (pow, mean, rsqrt, mul, sum, ...). `python
bench/cpu_kernels.py` on a 2-core AMD EPYC, forward + backward: RMSNorm 4096 x 512 torch 9.6 ms, this 2.1 ms;
SwiGLU 4096 x 1376 torch 13.3 ms, this 6.8 ms (17 norms and 8 MLPs in a `base` training step).

  lc_rms_norm_fwd   y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps) per row (the sum in float, as
                    torch's kernel); rstd kept for the backward. lc_rms_norm_fwd_bf16: the same on bf16 x
                    and w (a bf16 model's norms, no autograd), y rounded to bf16 once
  lc_rms_norm_bwd   dx = rstd * (g - x * rstd^2 * mean(g * x)), g = dy * w;  dw = sum over rows of
                    dy * x * rstd (per-thread partial sums, added at the end)
  lc_swiglu_fwd     h = silu(a) * b = a * sigmoid(a) * b
  lc_swiglu_bwd     da = dh * b * s * (1 + a (1 - s)),  db = dh * a * s,  s = sigmoid(a)
  lc_swiglu_fwd_bf16, lc_swiglu_bwd_bf16: the same on bf16 a, b, dh (bf16 training's MLP under autocast),
                    in fp32, each output rounded to bf16 once (torch's bf16 silu-then-mul rounds silu(a)
                    first, then the product; and keeps silu(a) for its backward)
  lc_softmax_xent, lc_softmax_xent_bf16: the chunked loss's step after the LM head, on a chunk of logits
                    z (n, V) in place: nll = lse(z) - z[label] per row, and z overwritten by d nll / dz =
                    softmax(z) - onehot(label), rounded once to z's dtype (a negative label: the row
                    ignored, nll 0 and zeros). torch takes five passes over (n, V) for this (log_softmax,
                    gather, exp, the -1, and under autocast a widening copy and a narrowing one, ~34 ms
                    for 1024 x 32000 bf16 logits on 2 Zen 5 cores).
  lc_rope, lc_rope_bf16: training's RoPE on q or k, forward and (transposed) backward, in one pass

sigmoid(a) is computed from exp(-|a|) (never overflows): s = 1 / (1 + e) for a >= 0, e / (1 + e) below.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "simd.h"

/* rows per thread below which one thread does the work (a decode step's few rows) */
#define PARALLEL_ROWS 64

void lc_rms_norm_bwd(const float *x, const float *w, const float *rstd, const float *dy, float *dx, float *dw,
                     int64_t M, int64_t D, int nthreads) {
  if (M < PARALLEL_ROWS) nthreads = 1;
  float *part = dw ? calloc((size_t)nthreads * D, sizeof(float)) : NULL;
#pragma omp parallel num_threads(nthreads)
  {
    int tid = omp_get_thread_num();
    float *pw = part ? part + (int64_t)tid * D : NULL;
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
      const float *xm = x + m * D, *gm = dy + m * D;
      float *dxm = dx + m * D, r = rstd[m];
      __m256 a = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) {
        __m256 g = _mm256_loadu_ps(gm + d);
        if (w) g = _mm256_mul_ps(g, _mm256_loadu_ps(w + d));
        a = _mm256_fmadd_ps(g, _mm256_loadu_ps(xm + d), a);
      }
      float gx = hsum8(a);
      for (; d < D; d++) gx += gm[d] * (w ? w[d] : 1.0f) * xm[d];
      float c = r * r * r * gx / (float)D; /* dx = r g - c x */
      __m256 rv = _mm256_set1_ps(r), cv = _mm256_set1_ps(c);
      for (d = 0; d + 8 <= D; d += 8) {
        __m256 dyv = _mm256_loadu_ps(gm + d), xv = _mm256_loadu_ps(xm + d);
        __m256 g = w ? _mm256_mul_ps(dyv, _mm256_loadu_ps(w + d)) : dyv;
        _mm256_storeu_ps(dxm + d, _mm256_fnmadd_ps(cv, xv, _mm256_mul_ps(rv, g)));
        if (pw) _mm256_storeu_ps(pw + d, _mm256_fmadd_ps(_mm256_mul_ps(dyv, xv), rv, _mm256_loadu_ps(pw + d)));
      }
      for (; d < D; d++) {
        dxm[d] = r * gm[d] * (w ? w[d] : 1.0f) - c * xm[d];
        if (pw) pw[d] += gm[d] * xm[d] * r;
      }
    }
  }
  if (dw) {
    for (int64_t d = 0; d < D; d++) {
      float s = 0.0f;
      for (int t = 0; t < nthreads; t++) s += part[(int64_t)t * D + d];
      dw[d] = s;
    }
    free(part);
  }
}

/* sigmoid on 8 floats, from exp(-|a|) <= 1 */
static inline __m256 sigmoid8(__m256 a) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  __m256 e = exp8(_mm256_or_ps(a, sign)); /* exp(-|a|) */
  __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
  __m256 neg = _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), neg);
}

#ifdef __AVX512F__
static inline __m512 sigmoid16(__m512 a) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 e = exp16(_mm512_or_ps(a, _mm512_set1_ps(-0.0f))); /* exp(-|a|) */
  __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
  __mmask16 neg = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_mul_ps(inv, neg, e, inv);
}
#endif

static inline float sigmoid1(float a) {
  float e = expf(-fabsf(a));
  return a >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

#define BLOCK 4096 /* elements per parallel work item */

/* The SwiGLU kernels once, for an element type T and how 8 of them (and one) load to fp32 and store back:
   fp32 as it is, bf16 widened exactly and rounded to nearest even (simd.h) */
#define LOAD8_F32(p) _mm256_loadu_ps(p)
#define STORE8_F32(p, v) _mm256_storeu_ps(p, v)
#define LOAD1_F32(x) (x)
#define STORE1_F32(x) (x)
#define LOAD8_BF16(p) ps_from_bf16x8(p)
#define STORE8_BF16(p, v) bf16x8_store(p, v)
#define LOAD1_BF16(x) f32_from_bf16(x)
#define STORE1_BF16(x) bf16_from_f32(x)

/* SwiGLU's forward and backward on 16 elements at i, in AVX-512 builds; none elsewhere. 1024 x 1376 bf16
   (`base`'s MLP at 1024 tokens), 2 threads, AMD EPYC Zen 5, best of 5: forward 0.56 -> 0.26 ms, backward
   0.81 -> 0.38 ms against the 8-wide loop alone */
#ifdef __AVX512F__
#define LOAD16_F32(p) _mm512_loadu_ps(p)
#define STORE16_F32(p, v) _mm512_storeu_ps(p, v)
#define LOAD16_BF16(p) ps_from_bf16x16(p)
#define STORE16_BF16(p, v) bf16x16_store(p, v)
#define SWIGLU_FWD16(TAG, a, b, h, i, end)                                                                  \
  for (; i + 16 <= end; i += 16) {                                                                          \
    __m512 av = LOAD16_##TAG(a + i);                                                                        \
    STORE16_##TAG(h + i, _mm512_mul_ps(_mm512_mul_ps(av, sigmoid16(av)), LOAD16_##TAG(b + i)));            \
  }
#define SWIGLU_BWD16(TAG, a, b, dh, da, db, i, end)                                                         \
  for (; i + 16 <= end; i += 16) {                                                                          \
    __m512 av = LOAD16_##TAG(a + i), bv = LOAD16_##TAG(b + i), g = LOAD16_##TAG(dh + i);                    \
    __m512 s = sigmoid16(av), as = _mm512_mul_ps(av, s);                                                    \
    __m512 dsilu = _mm512_fmadd_ps(as, _mm512_sub_ps(_mm512_set1_ps(1.0f), s), s);                         \
    STORE16_##TAG(da + i, _mm512_mul_ps(_mm512_mul_ps(g, bv), dsilu));                                      \
    STORE16_##TAG(db + i, _mm512_mul_ps(g, as));                                                            \
  }
#else
#define SWIGLU_FWD16(TAG, a, b, h, i, end)
#define SWIGLU_BWD16(TAG, a, b, dh, da, db, i, end)
#endif

/* RMSNorm's forward once for fp32 and bf16 x and w (a bf16 model's prefill and decode norms): the sum of
   squares and the products in fp32, y rounded to T once (torch's bf16 norm takes ~8 passes) */
#define RMS_NORM_FWD(SUFFIX, T, TAG)                                                                        \
  void lc_rms_norm_fwd##SUFFIX(const T *x, const T *w, T *y, float *rstd, int64_t M, int64_t D, float eps,  \
                               int nthreads) {                                                              \
    _Pragma("omp parallel for schedule(static) num_threads(M >= PARALLEL_ROWS ? nthreads : 1)")             \
    for (int64_t m = 0; m < M; m++) {                                                                       \
      const T *xm = x + m * D;                                                                              \
      T *ym = y + m * D;                                                                                    \
      __m256 a = _mm256_setzero_ps();                                                                       \
      int64_t d = 0;                                                                                        \
      for (; d + 8 <= D; d += 8) {                                                                          \
        __m256 v = LOAD8_##TAG(xm + d);                                                                     \
        a = _mm256_fmadd_ps(v, v, a);                                                                       \
      }                                                                                                     \
      float ss = hsum8(a);                                                                                  \
      for (; d < D; d++) ss += LOAD1_##TAG(xm[d]) * LOAD1_##TAG(xm[d]);                                     \
      float r = 1.0f / sqrtf(ss / (float)D + eps);                                                          \
      if (rstd) rstd[m] = r;                                                                                \
      __m256 rv = _mm256_set1_ps(r);                                                                        \
      for (d = 0; d + 8 <= D; d += 8) {                                                                     \
        __m256 v = _mm256_mul_ps(LOAD8_##TAG(xm + d), rv);                                                  \
        STORE8_##TAG(ym + d, w ? _mm256_mul_ps(v, LOAD8_##TAG(w + d)) : v);                                 \
      }                                                                                                     \
      for (; d < D; d++) ym[d] = STORE1_##TAG(LOAD1_##TAG(xm[d]) * r * (w ? LOAD1_##TAG(w[d]) : 1.0f));     \
    }                                                                                                       \
  }

RMS_NORM_FWD(, float, F32)
RMS_NORM_FWD(_bf16, uint16_t, BF16)

#define SWIGLU(SUFFIX, T, TAG)                                                                              \
  void lc_swiglu_fwd##SUFFIX(const T *a, const T *b, T *h, int64_t n, int nthreads) {                      \
    int64_t blocks = (n + BLOCK - 1) / BLOCK;                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(blocks > 1 ? nthreads : 1)")                     \
    for (int64_t blk = 0; blk < blocks; blk++) {                                                            \
      int64_t i = blk * BLOCK, end = i + BLOCK < n ? i + BLOCK : n;                                         \
      SWIGLU_FWD16(TAG, a, b, h, i, end)                                                                    \
      for (; i + 8 <= end; i += 8) {                                                                        \
        __m256 av = LOAD8_##TAG(a + i);                                                                     \
        STORE8_##TAG(h + i, _mm256_mul_ps(_mm256_mul_ps(av, sigmoid8(av)), LOAD8_##TAG(b + i)));           \
      }                                                                                                     \
      for (; i < end; i++) {                                                                                \
        float x = LOAD1_##TAG(a[i]);                                                                        \
        h[i] = STORE1_##TAG(x * sigmoid1(x) * LOAD1_##TAG(b[i]));                                           \
      }                                                                                                     \
    }                                                                                                       \
  }                                                                                                         \
                                                                                                            \
  void lc_swiglu_bwd##SUFFIX(const T *a, const T *b, const T *dh, T *da, T *db, int64_t n, int nthreads) { \
    int64_t blocks = (n + BLOCK - 1) / BLOCK;                                                               \
    const __m256 one = _mm256_set1_ps(1.0f);                                                                \
    _Pragma("omp parallel for schedule(static) num_threads(blocks > 1 ? nthreads : 1)")                     \
    for (int64_t blk = 0; blk < blocks; blk++) {                                                            \
      int64_t i = blk * BLOCK, end = i + BLOCK < n ? i + BLOCK : n;                                         \
      SWIGLU_BWD16(TAG, a, b, dh, da, db, i, end)                                                           \
      for (; i + 8 <= end; i += 8) {                                                                        \
        __m256 av = LOAD8_##TAG(a + i), bv = LOAD8_##TAG(b + i), g = LOAD8_##TAG(dh + i);                   \
        __m256 s = sigmoid8(av);                                                                            \
        __m256 as = _mm256_mul_ps(av, s); /* silu(a) */                                                     \
        /* d silu / da = s (1 + a (1 - s)) = s + as (1 - s) */                                              \
        __m256 dsilu = _mm256_fmadd_ps(as, _mm256_sub_ps(one, s), s);                                      \
        STORE8_##TAG(da + i, _mm256_mul_ps(_mm256_mul_ps(g, bv), dsilu));                                   \
        STORE8_##TAG(db + i, _mm256_mul_ps(g, as));                                                         \
      }                                                                                                     \
      for (; i < end; i++) {                                                                                \
        float x = LOAD1_##TAG(a[i]), y = LOAD1_##TAG(b[i]), g = LOAD1_##TAG(dh[i]);                         \
        float s = sigmoid1(x), as = x * s;                                                                  \
        da[i] = STORE1_##TAG(g * y * (s + as * (1.0f - s)));                                                \
        db[i] = STORE1_##TAG(g * as);                                                                       \
      }                                                                                                     \
    }                                                                                                       \
  }

SWIGLU(, float, F32)
SWIGLU(_bf16, uint16_t, BF16)

/* Per row: the max, then exp(z - max) once per logit into a row of fp32 scratch (V floats a thread, in L2)
   and its sum, then softmax = that / sum written back. fp32 arithmetic throughout (bf16 logits widened
   exactly), as torch's log_softmax of the widened chunk then exp; a row holding NaN or an infinity gets a
   NaN loss and NaN gradients, as torch's would. Returns 1 if the scratch could not be allocated. */
#define SOFTMAX_XENT(SUFFIX, T, TAG)                                                                        \
  int lc_softmax_xent##SUFFIX(T *z, const int64_t *labels, float *nll, int64_t n, int64_t V, int nthreads) { \
    int failed = 0;                                                                                         \
    _Pragma("omp parallel num_threads(n > 1 ? nthreads : 1) reduction(| : failed)") {                      \
      float *e = malloc(sizeof(float) * V);                                                                 \
      failed = e == NULL;                                                                                   \
      _Pragma("omp for schedule(static)") for (int64_t r = 0; r < n; r++) {                                 \
        T *row = z + r * V;                                                                                 \
        const int64_t y = labels[r];                                                                        \
        if (e == NULL) continue;                                                                            \
        if (y < 0) {                                                                                        \
          memset(row, 0, sizeof(T) * V), nll[r] = 0.0f;                                                     \
          continue;                                                                                         \
        }                                                                                                   \
        __m256 mv = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();                                   \
        int64_t i = 0;                                                                                      \
        for (; i + 8 <= V; i += 8) {                                                                        \
          __m256 v = LOAD8_##TAG(row + i);                                                                  \
          mv = _mm256_max_ps(mv, v), bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));            \
        }                                                                                                   \
        float m = hmax8(mv);                                                                                \
        int nan = _mm256_movemask_ps(bad) != 0;                                                             \
        for (; i < V; i++) {                                                                                \
          float v = LOAD1_##TAG(row[i]);                                                                    \
          m = v > m ? v : m, nan |= v != v;                                                                 \
        }                                                                                                   \
        if (nan || !isfinite(m)) {                                                                          \
          for (i = 0; i < V; i++) row[i] = STORE1_##TAG(NAN);                                               \
          nll[r] = NAN;                                                                                     \
          continue;                                                                                         \
        }                                                                                                   \
        const __m256 mb = _mm256_set1_ps(m);                                                                \
        __m256 sv = _mm256_setzero_ps();                                                                    \
        for (i = 0; i + 8 <= V; i += 8) {                                                                   \
          __m256 t = exp8(_mm256_sub_ps(LOAD8_##TAG(row + i), mb));                                         \
          _mm256_storeu_ps(e + i, t), sv = _mm256_add_ps(sv, t);                                            \
        }                                                                                                   \
        float sum = hsum8(sv);                                                                              \
        for (; i < V; i++) e[i] = expf(LOAD1_##TAG(row[i]) - m), sum += e[i];                               \
        nll[r] = m + logf(sum) - LOAD1_##TAG(row[y]);                                                       \
        const float inv = 1.0f / sum;                                                                       \
        const __m256 iv = _mm256_set1_ps(inv);                                                              \
        for (i = 0; i + 8 <= V; i += 8) STORE8_##TAG(row + i, _mm256_mul_ps(_mm256_loadu_ps(e + i), iv));   \
        for (; i < V; i++) row[i] = STORE1_##TAG(e[i] * inv);                                               \
        row[y] = STORE1_##TAG(e[y] * inv - 1.0f);                                                           \
      }                                                                                                     \
      free(e);                                                                                              \
    }                                                                                                       \
    return failed;                                                                                          \
  }

SOFTMAX_XENT(, float, F32)
SOFTMAX_XENT(_bf16, uint16_t, BF16)

/* RoPE on q or k (B, H, T, hd) in HF's half-split layout, h = rd / 2 pairs (i, i + h) per row of hd and the
   dims past rd copied: y = x cos + rotate_half(x) sin, i.e. y[i] = x[i] c[i] - x[i+h] s[i] and y[i+h] =
   x[i+h] c[i+h] + x[i] s[i+h]; `transpose` applies the transposed map instead (the backward: dx = g cos +
   rotate_half^T(g sin)). cos and sin are fp32 (B or 1, T, rd) rows, batch stride cb (0: shared); x and y
   rows are hd contiguous values at strides xs / ys (batch, head, time). fp32 products, y rounded to T once
   (torch's bf16 path rounds cos and sin to bf16 first, then every product). torch's chain is ~6 passes with
   their backward (mul, neg, cat, add): at `base`'s 1024 tokens 10.7 ms of a bf16 step on 2 Zen 5 cores in a
   profile, these 7.3 ms. */
#define ROPE(SUFFIX, T_, TAG)                                                                               \
  void lc_rope##SUFFIX(const T_ *x, const float *cos, const float *sin, T_ *y, int64_t B, int64_t H,       \
                       int64_t T, int64_t hd, int64_t rd, const int64_t *xs, const int64_t *ys, int64_t cb,  \
                       int transpose, int nthreads) {                                                       \
    const int64_t h = rd / 2, rows = B * H * T;                                                             \
    const float sign = transpose ? -1.0f : 1.0f;                                                            \
    _Pragma("omp parallel for schedule(static) num_threads(rows >= PARALLEL_ROWS ? nthreads : 1)")          \
    for (int64_t r = 0; r < rows; r++) {                                                                    \
      const int64_t b = r / (H * T), hh = (r / T) % H, t = r % T;                                           \
      const T_ *xr = x + b * xs[0] + hh * xs[1] + t * xs[2];                                                \
      T_ *yr = y + b * ys[0] + hh * ys[1] + t * ys[2];                                                      \
      const float *c = cos + b * cb + t * rd, *sn = sin + b * cb + t * rd;                                  \
      /* y[i] = x1 c[i] - sign x2 s1[i], y[i+h] = x2 c[i+h] + sign x1 s2[i]; transposed, the sines swap */  \
      const float *s1 = transpose ? sn + h : sn, *s2 = transpose ? sn : sn + h;                             \
      const __m256 sg = _mm256_set1_ps(sign);                                                               \
      int64_t i = 0;                                                                                        \
      for (; i + 8 <= h; i += 8) {                                                                          \
        __m256 x1 = LOAD8_##TAG(xr + i), x2 = LOAD8_##TAG(xr + i + h);                                      \
        __m256 a = _mm256_mul_ps(x1, _mm256_loadu_ps(c + i));                                               \
        __m256 p = _mm256_mul_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(s1 + i)), sg);                           \
        __m256 q = _mm256_mul_ps(x2, _mm256_loadu_ps(c + i + h));                                           \
        __m256 u = _mm256_mul_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(s2 + i)), sg);                           \
        STORE8_##TAG(yr + i, _mm256_sub_ps(a, p));                                                          \
        STORE8_##TAG(yr + i + h, _mm256_add_ps(q, u));                                                      \
      }                                                                                                     \
      for (; i < h; i++) {                                                                                  \
        float x1 = LOAD1_##TAG(xr[i]), x2 = LOAD1_##TAG(xr[i + h]);                                         \
        yr[i] = STORE1_##TAG(x1 * c[i] - sign * (x2 * s1[i]));                                              \
        yr[i + h] = STORE1_##TAG(x2 * c[i + h] + sign * (x1 * s2[i]));                                      \
      }                                                                                                     \
      for (i = rd; i < hd; i++) yr[i] = xr[i];                                                              \
    }                                                                                                       \
  }

ROPE(, float, F32)
ROPE(_bf16, uint16_t, BF16)
