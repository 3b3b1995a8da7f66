/* Causal (or full) attention forward and backward for training on x86-64 CPUs with AVX2 and FMA
(built by longctx/kernels, wrapped as the op longctx::flash_attention_cpu in longctx/attention/cpu_flash.py),
and, in builds with AVX512-BF16, a forward and backward on bf16 q/k/v (the op longctx::flash_attention_bf16;
at the end of this file).

FlashAttention's algorithm (Dao et al. 2022): scores are computed block by block and never stored whole;
the forward keeps the output and each row's logsumexp, the backward recomputes the probabilities from
them. Memory O(L d).

Why not torch's CPU flash kernel: on a 2-core AMD EPYC (fp32 matmul peak ~179 GFLOP/s with MKL), causal,
4096 tokens, 8 heads of 64, the model's strided layout, torch's runs forward + backward in ~510 ms (~118
GFLOP/s, counting the backward as 2.5 forwards), this file in ~395 ms (~153). What made the difference:
- every operand of a block product is read from a small contiguous copy. The model's q/k/v are views of
  (B, T, H, hd), rows 2 KB apart: a block of such rows maps onto a few L1 cache sets and thrashes them
  (copying took the backward from ~375 to ~300 ms);
- one register-tiled micro-kernel (6 rows x 16 columns, 12 accumulators) for all seven block products,
  each phrased as C += A B with both row-major, transposed copies (K^T, Q^T, dO^T) made once. It runs at
  ~91-96 GFLOP/s per core on these shapes, about MKL's per-core peak;
- 96 x 96 blocks (the best of 48-192 tried): a block's scores fit L1, and the diagonal wastes little;
- in the backward, query blocks outside and key blocks inside (~300 -> ~270 ms): a query block's four
  tile-sized copies stay in L1/L2 for all its key blocks, and a thread's buffers are 3 Lk hd floats
  (K^T, K, V of its key head) instead of whole-sequence copies of everything.
Threads: OpenMP (torch's own libgomp pool); the forward splits (batch, head, query block), the backward
(batch, key head), so its dK/dV need no reduction across threads. hd must be a multiple of 16.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* C (R x 16) (+)= A (R x K, row stride lda) . B (K x 16, row stride ldb): R rows of A broadcast, two
   8-wide vectors of B per k, 2R accumulators in registers. */
#define TILE(R)                                                                                             \
  static inline __attribute__((always_inline)) void tile##R(const float *A, int64_t lda, const float *B,    \
                                                            int64_t ldb, float *C, int64_t ldc, int64_t K,   \
                                                            int acc) {                                       \
    __m256 c0[R], c1[R];                                                                                     \
    for (int r = 0; r < R; r++) {                                                                            \
      c0[r] = acc ? _mm256_loadu_ps(C + r * ldc) : _mm256_setzero_ps();                                      \
      c1[r] = acc ? _mm256_loadu_ps(C + r * ldc + 8) : _mm256_setzero_ps();                                  \
    }                                                                                                        \
    for (int64_t k = 0; k < K; k++) {                                                                        \
      __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);                       \
      for (int r = 0; r < R; r++) {                                                                          \
        __m256 a = _mm256_broadcast_ss(A + r * lda + k);                                                     \
        c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);                                                               \
        c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);                                                               \
      }                                                                                                      \
    }                                                                                                        \
    for (int r = 0; r < R; r++) {                                                                            \
      _mm256_storeu_ps(C + r * ldc, c0[r]);                                                                  \
      _mm256_storeu_ps(C + r * ldc + 8, c1[r]);                                                              \
    }                                                                                                        \
  }
TILE(1)
TILE(2)
TILE(3)
TILE(4)
TILE(5)
TILE(6)

/* C (M x N) = [C +] A (M x K) . B (K x N); all row-major with the given row strides; N % 16 == 0. */
static void gemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb,
                 float *C, int64_t ldc, int acc) {
  for (int64_t n = 0; n < N; n += 16) {
    int64_t m = 0;
    for (; m + 6 <= M; m += 6) tile6(A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc, K, acc);
    const float *a = A + m * lda;
    float *c = C + m * ldc + n;
    switch (M - m) {
      case 5: tile5(a, lda, B + n, ldb, c, ldc, K, acc); break;
      case 4: tile4(a, lda, B + n, ldb, c, ldc, K, acc); break;
      case 3: tile3(a, lda, B + n, ldb, c, ldc, K, acc); break;
      case 2: tile2(a, lda, B + n, ldb, c, ldc, K, acc); break;
      case 1: tile1(a, lda, B + n, ldb, c, ldc, K, acc); break;
      default: break;
    }
  }
}

#ifndef BQ
#define BQ 96
#endif
#ifndef BK
#define BK 96
#endif
#define ROUND16(x) (((x) + 15) & ~(int64_t)15)

static float *falloc(int64_t n) { return aligned_alloc(64, ((n * 4 + 63) / 64) * 64); }

/* dst (D x n16) <- src (n x D, row stride ld) transposed, times mul; columns n..n16 zero */
static void pack_t(const float *src, int64_t ld, int64_t n, int64_t D, float *dst, int64_t lddst, float mul) {
  for (int64_t d = 0; d < D; d++) {
    float *row = dst + d * lddst;
    for (int64_t i = 0; i < n; i++) row[i] = src[i * ld + d] * mul;
    for (int64_t i = n; i < ROUND16(n); i++) row[i] = 0.0f;
  }
}

/* One key block of the online softmax, for the M query rows of a block (FlashAttention's forward): S (M x
   npad, row stride ld) holds the rows' scores for keys j0 .. j0 + cols, times `mul`; row r sees the keys up
   to j0 + first + r (causal; first = q_offset + i0 - j0, or huge when nothing is masked). On return S holds
   exp(score - new max) (0 where masked, and for columns cols .. npad), and each row's running max m,
   sum l and output O (M x hd) are rescaled to the new max. Shared by the fp32 and bf16 forwards. */
static void online_softmax(float *S, int64_t ld, int64_t M, int64_t cols, int64_t npad, int64_t first, float mul,
                           float *m, float *l, float *O, int64_t hd) {
#ifndef __AVX512F__
  const __m256 mulv = _mm256_set1_ps(mul);
#endif
  for (int64_t r = 0; r < M; r++) {
    float *s = S + r * ld;
    int64_t lim = first + r + 1; /* keys [j0, j0 + vis) are visible to this row */
    int64_t vis = lim < 0 ? 0 : (lim < cols ? lim : cols);
    if (vis == 0) { /* no key of this block is visible to this row yet: it adds nothing */
      memset(s, 0, sizeof(float) * npad);
      continue;
    }
    for (int64_t c = vis; c < npad; c++) s[c] = -INFINITY;
#ifdef __AVX512F__ /* npad % 16 == 0 in both forwards: the same passes 16 wide (with the bf16 backward's,
                      bf16 fwd + bwd at `base` shapes, 4096 tokens, Zen 5: 132 -> 113 ms) */
    /* the scale (> 0: max(mul s) = mul max(s)) goes into the exponent's FMA, not a pass of its own */
    const int fold = mul > 0.0f;
    const __m512 mul16 = _mm512_set1_ps(fold ? mul : 1.0f);
    if (!fold && mul != 1.0f)
      for (int64_t c = 0; c < npad; c += 16)
        _mm512_storeu_ps(s + c, _mm512_mul_ps(_mm512_loadu_ps(s + c), _mm512_set1_ps(mul)));
    __m512 mx16 = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < npad; c += 16) mx16 = _mm512_max_ps(mx16, _mm512_loadu_ps(s + c));
    float mnew = _mm512_reduce_max_ps(mx16) * (fold ? mul : 1.0f);
    if (mnew < m[r]) mnew = m[r];
    float alpha = m[r] == -INFINITY ? 0.0f : expf(m[r] - mnew);
    __m512 mv16 = _mm512_set1_ps(mnew), sum16 = _mm512_setzero_ps();
    for (int64_t c = 0; c < npad; c += 16) {
      __m512 e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + c), mul16, mv16));
      sum16 = _mm512_add_ps(sum16, e);
      _mm512_storeu_ps(s + c, e);
    }
    l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum16);
#else
    if (mul != 1.0f) /* the fp32 forward's K^T is pre-scaled: no pass here */
      for (int64_t c = 0; c < npad; c += 8) _mm256_storeu_ps(s + c, _mm256_mul_ps(_mm256_loadu_ps(s + c), mulv));
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t c = 0; c < npad; c += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + c));
    float mnew = hmax8(mx);
    if (mnew < m[r]) mnew = m[r];
    float alpha = m[r] == -INFINITY ? 0.0f : expf(m[r] - mnew);
    __m256 mv = _mm256_set1_ps(mnew), sum = _mm256_setzero_ps();
    for (int64_t c = 0; c < npad; c += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), mv));
      sum = _mm256_add_ps(sum, e);
      _mm256_storeu_ps(s + c, e);
    }
    l[r] = l[r] * alpha + hsum8(sum);
#endif
    m[r] = mnew;
    if (alpha != 1.0f) {
      __m256 av = _mm256_set1_ps(alpha);
      for (int64_t d = 0; d < hd; d += 8)
        _mm256_storeu_ps(O + r * hd + d, _mm256_mul_ps(av, _mm256_loadu_ps(O + r * hd + d)));
    }
  }
}

/* Forward. q (B,H,Lq,hd), k/v (B,Hk,Lk,hd), o (B,H,Lq,hd) given by strides (batch, head, row) with
   unit stride inside a row; lse (B,H,Lq) contiguous, natural log. Query i sits at key q_offset + i.
   Returns 0, or 1 when a buffer could not be allocated (nothing useful was written). */
int lc_flash_forward(const float *q, const float *k, const float *v, float *o, float *lse, int64_t B,
                      int64_t H, int64_t Hk, int64_t Lq, int64_t Lk, int64_t hd, const int64_t *qs,
                      const int64_t *ks, const int64_t *vs, const int64_t *os, int64_t q_offset, int causal,
                      float scale, int nthreads) {
  int64_t G = H / Hk, nqb = (Lq + BQ - 1) / BQ, nkb = (Lk + BK - 1) / BK;
  /* K^T per (b, kv head), blocked by BK: block j is hd x BK, scaled */
  float *KT = falloc(B * Hk * nkb * hd * BK), *VP = falloc(B * Hk * Lk * hd);
  if (!KT || !VP) {
    free(KT), free(VP);
    return 1;
  }
  int failed = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < B * Hk * nkb; t++) {
    int64_t bh = t / nkb, j = t % nkb, b = bh / Hk, h = bh % Hk;
    int64_t j0 = j * BK, cols = Lk - j0 < BK ? Lk - j0 : BK;
    float *dst = KT + t * hd * BK;
    pack_t(k + b * ks[0] + h * ks[1] + j0 * ks[2], ks[2], cols, hd, dst, BK, scale);
  }
  /* V per (b, kv head) with rows contiguous: a strided V (heads interleaved, rows 2 KB apart) maps its
     rows onto a few L1 sets and thrashes them */
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < B * Hk; t++)
    for (int64_t j = 0; j < Lk; j++)
      memcpy(VP + (t * Lk + j) * hd, v + (t / Hk) * vs[0] + (t % Hk) * vs[1] + j * vs[2], sizeof(float) * hd);
  int64_t ntask = B * H * nqb;
#pragma omp parallel num_threads(nthreads)
  {
    float *S = falloc(BQ * BK), *O = falloc(BQ * hd), *m = falloc(BQ), *l = falloc(BQ), *QB = falloc(BQ * hd);
    int ok = S && O && m && l && QB;
    if (!ok) failed = 1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; t++) {
      if (!ok) continue;
      int64_t qb = nqb - 1 - t % nqb, bh = t / nqb, b = bh / H, h = bh % H, kh = h / G;
      int64_t i0 = qb * BQ, M = Lq - i0 < BQ ? Lq - i0 : BQ;
      const float *Qs = q + b * qs[0] + h * qs[1] + i0 * qs[2];
      for (int64_t r = 0; r < M; r++) memcpy(QB + r * hd, Qs + r * qs[2], sizeof(float) * hd);
      const float *Q = QB;
      const float *Vb = VP + (b * Hk + kh) * Lk * hd;
      int64_t last = causal ? q_offset + i0 + M - 1 : Lk - 1; /* last key any row here sees */
      if (last > Lk - 1) last = Lk - 1;
      for (int64_t r = 0; r < M; r++) m[r] = -INFINITY, l[r] = 0.0f;
      memset(O, 0, sizeof(float) * M * hd);
      for (int64_t j = 0; j * BK <= last; j++) {
        int64_t j0 = j * BK, cols = Lk - j0 < BK ? Lk - j0 : BK, n16 = ROUND16(cols);
        gemm(M, n16, hd, Q, hd, KT + ((b * Hk + kh) * nkb + j) * hd * BK, BK, S, BK, 0);
        online_softmax(S, BK, M, cols, n16, causal ? q_offset + i0 - j0 : INT64_MAX / 2, 1.0f, m, l, O, hd);
        gemm(M, hd, cols, S, BK, Vb + j0 * hd, hd, O, hd, 1);
      }
      for (int64_t r = 0; r < M; r++) {
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        float *dst = o + b * os[0] + h * os[1] + (i0 + r) * os[2];
        for (int64_t d = 0; d < hd; d++) dst[d] = O[r * hd + d] * inv;
        lse[(b * H + h) * Lq + i0 + r] = l[r] > 0.0f ? m[r] + logf(l[r]) : INFINITY;
      }
    }
    free(S), free(O), free(m), free(l), free(QB);
  }
  free(KT), free(VP);
  return failed;
}

/* Backward, one task per (batch, key head): its K^T, K and V are packed once and serve every query head of
   the group; each query block's Q^T, dO^T, Q, dO and dQ^T are tile-sized buffers, reused across all key
   blocks (query blocks outside, key blocks inside). dK/dV accumulate straight into the outputs, which
   only this task writes. Per thread: 3 Lk hd floats + tiles. Returns 0, or 1 when a buffer could not be
   allocated. */
int lc_flash_backward(const float *q, const float *k, const float *v, const float *o, const float *dout,
                       const float *lse, float *dq, float *dk, float *dv, int64_t B, int64_t H, int64_t Hk,
                       int64_t Lq, int64_t Lk, int64_t hd, const int64_t *qs, const int64_t *ks,
                       const int64_t *vs, const int64_t *os, const int64_t *dos, const int64_t *dqs,
                       const int64_t *dks, const int64_t *dvs, int64_t q_offset, int causal, float scale,
                       int nthreads) {
  int64_t G = H / Hk, nqb = (Lq + BQ - 1) / BQ, nkb = (Lk + BK - 1) / BK;
  if (nthreads > B * Hk) nthreads = (int)(B * Hk); /* no buffers for threads without a task */
  int failed = 0;
#pragma omp parallel num_threads(nthreads)
  {
    float *KT = falloc(hd * nkb * BK), *KR = falloc(Lk * hd), *VR = falloc(Lk * hd);
    float *QT = falloc(hd * BQ), *dOT = falloc(hd * BQ), *dQT = falloc(hd * BQ);
    float *QR = falloc(BQ * hd), *dOR = falloc(BQ * hd), *Dv = falloc(BQ);
    float *P = falloc(BK * BQ), *dP = falloc(BK * BQ);
    int ok = KT && KR && VR && QT && dOT && dQT && QR && dOR && Dv && P && dP;
    if (!ok) failed = 1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < B * Hk; t++) {
      if (!ok) continue;
      int64_t b = t / Hk, kh = t % Hk;
      const float *K = k + b * ks[0] + kh * ks[1], *V = v + b * vs[0] + kh * vs[1];
      float *dK = dk + b * dks[0] + kh * dks[1], *dV = dv + b * dvs[0] + kh * dvs[1];
      for (int64_t j = 0; j < nkb; j++) {
        int64_t j0 = j * BK, cols = Lk - j0 < BK ? Lk - j0 : BK;
        pack_t(K + j0 * ks[2], ks[2], cols, hd, KT + j * hd * BK, BK, 1.0f);
      }
      for (int64_t j = 0; j < Lk; j++) {
        memcpy(KR + j * hd, K + j * ks[2], sizeof(float) * hd);
        memcpy(VR + j * hd, V + j * vs[2], sizeof(float) * hd);
        memset(dK + j * dks[2], 0, sizeof(float) * hd);
        memset(dV + j * dvs[2], 0, sizeof(float) * hd);
      }
      for (int64_t h = kh * G; h < (kh + 1) * G; h++) {
        const float *Q = q + b * qs[0] + h * qs[1], *dO = dout + b * dos[0] + h * dos[1];
        const float *O = o + b * os[0] + h * os[1], *LSE = lse + (b * H + h) * Lq;
        float *dQ = dq + b * dqs[0] + h * dqs[1];
        for (int64_t i = 0; i < nqb; i++) {
          int64_t i0 = i * BQ, M = Lq - i0 < BQ ? Lq - i0 : BQ, n16 = ROUND16(M);
          pack_t(Q + i0 * qs[2], qs[2], M, hd, QT, BQ, scale);
          pack_t(dO + i0 * dos[2], dos[2], M, hd, dOT, BQ, 1.0f);
          for (int64_t r = 0; r < M; r++) {
            memcpy(QR + r * hd, Q + (i0 + r) * qs[2], sizeof(float) * hd);
            memcpy(dOR + r * hd, dO + (i0 + r) * dos[2], sizeof(float) * hd);
            __m256 a = _mm256_setzero_ps();
            for (int64_t d = 0; d < hd; d += 8)
              a = _mm256_fmadd_ps(_mm256_loadu_ps(dOR + r * hd + d), _mm256_loadu_ps(O + (i0 + r) * os[2] + d), a);
            Dv[r] = hsum8(a);
          }
          for (int64_t r = M; r < n16; r++) Dv[r] = 0.0f;
          memset(dQT, 0, sizeof(float) * hd * BQ);
          /* key blocks with a key some query of this block sees */
          int64_t last = causal ? q_offset + i0 + M - 1 : Lk - 1;
          if (last > Lk - 1) last = Lk - 1;
          for (int64_t j = 0; j * BK <= last; j++) {
            int64_t j0 = j * BK, cols = Lk - j0 < BK ? Lk - j0 : BK;
            /* S^T (cols x n16) = K_j . (scale Q_i)^T */
            gemm(cols, n16, hd, KR + j0 * hd, hd, QT, BQ, P, BQ, 0);
            int diag = causal && j0 + cols - 1 > q_offset + i0;
            for (int64_t c = 0; c < cols; c++) {
              float *p = P + c * BQ;
              int64_t r0 = 0; /* the first query row that sees key j0 + c */
              if (diag) {
                int64_t f = j0 + c - q_offset - i0;
                r0 = f < 0 ? 0 : (f > n16 ? n16 : f);
              }
              int64_t r = 0;
              for (; r < r0; r++) p[r] = 0.0f;
              for (; r < M && (r & 7); r++) p[r] = expf(p[r] - LSE[i0 + r]);
              for (; r + 8 <= M; r += 8)
                _mm256_storeu_ps(p + r, exp8(_mm256_sub_ps(_mm256_loadu_ps(p + r), _mm256_loadu_ps(LSE + i0 + r))));
              for (; r < M; r++) p[r] = expf(p[r] - LSE[i0 + r]);
              for (; r < n16; r++) p[r] = 0.0f;
            }
            /* dV_j += P^T . dO_i */
            gemm(cols, hd, M, P, BQ, dOR, hd, dV + j0 * dvs[2], dvs[2], 1);
            /* dP^T (cols x n16) = V_j . dO_i^T */
            gemm(cols, n16, hd, VR + j0 * hd, hd, dOT, BQ, dP, BQ, 0);
            /* dS^T = P^T * (dP^T - D) * scale */
            __m256 sv = _mm256_set1_ps(scale);
            for (int64_t c = 0; c < cols; c++) {
              float *p = P + c * BQ, *dp = dP + c * BQ;
              for (int64_t r = 0; r < n16; r += 8) {
                __m256 x = _mm256_sub_ps(_mm256_loadu_ps(dp + r), _mm256_loadu_ps(Dv + r));
                _mm256_storeu_ps(p + r, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(p + r), x), sv));
              }
            }
            /* dK_j += dS^T . Q_i */
            gemm(cols, hd, M, P, BQ, QR, hd, dK + j0 * dks[2], dks[2], 1);
            /* dQ_i^T += K_j^T . dS^T */
            gemm(hd, n16, cols, KT + j * hd * BK, BK, P, BQ, dQT, BQ, 1);
          }
          for (int64_t r = 0; r < M; r++)
            for (int64_t d = 0; d < hd; d++) dQ[(i0 + r) * dqs[2] + d] = dQT[d * BQ + r];
        }
      }
    }
    free(KT), free(KR), free(VR), free(QT), free(dOT), free(dQT), free(QR), free(dOR), free(Dv), free(P);
    free(dP);
  }
  return failed;
}

#ifdef __AVX512BF16__
/* ---- bf16 q, k, v (inference, prefill and training on a CPU with AVX512-BF16: Zen 4 and later, Cooper Lake,
   Sapphire Rapids) --------------------------------------------------------------------------------------
   vdpbf16ps multiplies 16 pairs of bf16 and adds both products to 16 fp32 accumulators: twice the products
   of an fp32 FMA per instruction, on operands of half the bytes. The algorithm and the blocks are the fp32
   forward's; the products take bf16 operands with fp32 accumulation: Q K^T on q and k as given, P V on the
   probabilities rounded to bf16 (as FlashAttention-2 does in bf16), the softmax in fp32, the output
   rounded to bf16 once. B operands are packed as pairs along the inner dimension (the layout vdpbf16ps
   reads: one 32-bit word holds the two bf16 of rows 2p and 2p + 1 of a column). hd % 32 == 0. */

/* C (R x 32) (+)= A (R x 2KP bf16, row stride lda) . B (KP x 32 pairs, row stride ldb words) */
#define TILEB(R)                                                                                             \
  static inline __attribute__((always_inline)) void tileb##R(const uint16_t *A, int64_t lda, const uint32_t *B, \
                                                             int64_t ldb, float *C, int64_t ldc, int64_t KP,   \
                                                             int acc) {                                        \
    __m512 c0[R], c1[R];                                                                                     \
    for (int r = 0; r < R; r++) {                                                                            \
      c0[r] = acc ? _mm512_loadu_ps(C + r * ldc) : _mm512_setzero_ps();                                      \
      c1[r] = acc ? _mm512_loadu_ps(C + r * ldc + 16) : _mm512_setzero_ps();                                 \
    }                                                                                                        \
    for (int64_t p = 0; p < KP; p++) {                                                                       \
      __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + p * ldb), b1 = (__m512bh)_mm512_loadu_si512(B + p * ldb + 16); \
      for (int r = 0; r < R; r++) {                                                                          \
        uint32_t pair;                                                                                       \
        memcpy(&pair, A + r * lda + 2 * p, 4);                                                               \
        __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);                                                 \
        c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);                                                              \
        c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);                                                              \
      }                                                                                                      \
    }                                                                                                        \
    for (int r = 0; r < R; r++) {                                                                            \
      _mm512_storeu_ps(C + r * ldc, c0[r]);                                                                  \
      _mm512_storeu_ps(C + r * ldc + 16, c1[r]);                                                             \
    }                                                                                                        \
  }
TILEB(1)
TILEB(2)
TILEB(3)
TILEB(4)
TILEB(5)
TILEB(6)
TILEB(7)
TILEB(8)

/* C (M x N) = [C +] A (M x 2KP, bf16) . B (KP x N pairs); N % 32 == 0 */
static void gemm_bf16(int64_t M, int64_t N, int64_t KP, const uint16_t *A, int64_t lda, const uint32_t *B,
                      int64_t ldb, float *C, int64_t ldc, int acc) {
  for (int64_t n = 0; n < N; n += 32) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) tileb8(A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc, KP, acc);
    const uint16_t *a = A + m * lda;
    float *c = C + m * ldc + n;
    switch (M - m) {
      case 7: tileb7(a, lda, B + n, ldb, c, ldc, KP, acc); break;
      case 6: tileb6(a, lda, B + n, ldb, c, ldc, KP, acc); break;
      case 5: tileb5(a, lda, B + n, ldb, c, ldc, KP, acc); break;
      case 4: tileb4(a, lda, B + n, ldb, c, ldc, KP, acc); break;
      case 3: tileb3(a, lda, B + n, ldb, c, ldc, KP, acc); break;
      case 2: tileb2(a, lda, B + n, ldb, c, ldc, KP, acc); break;
      case 1: tileb1(a, lda, B + n, ldb, c, ldc, KP, acc); break;
      default: break;
    }
  }
}

/* n fp32 -> bf16, round to nearest even (n % 16 == 0) */
static inline void to_bf16_row(const float *src, uint16_t *dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
}

#define ROUND32(x) (((x) + 31) & ~(int64_t)31)

/* The two layouts of a B operand of gemm_bf16, from a bf16 matrix X (n x D, row stride ld; rows past n read
   as zero):
   pack_pairs_t: X^T in pairs along D, dst[p * lddst + i] = (X[i][2p], X[i][2p + 1]) for i < npad — the
   32-bit word at column 2p of row i, so a product with X^T (Q K^T, V dO^T) reads X's rows as they are;
   pack_pairs_rows: X in pairs of rows, dst[p * D + d] = (X[2p][d], X[2p + 1][d]) for p < npairs — a product
   with X itself (P V, P^T dO, dS^T Q). */
static void pack_pairs_t(const uint16_t *src, int64_t ld, int64_t n, int64_t npad, int64_t D, uint32_t *dst,
                         int64_t lddst) {
  for (int64_t i = 0; i < npad; i++)
    for (int64_t p = 0; p < D / 2; p++) {
      uint32_t w = 0;
      if (i < n) memcpy(&w, src + i * ld + 2 * p, 4);
      dst[p * lddst + i] = w;
    }
}

static void pack_pairs_rows(const uint16_t *src, int64_t ld, int64_t n, int64_t npairs, int64_t D, uint32_t *dst) {
  for (int64_t p = 0; p < npairs; p++)
    for (int64_t d = 0; d < D; d++) {
      uint32_t lo = 2 * p < n ? src[2 * p * ld + d] : 0, hi = 2 * p + 1 < n ? src[(2 * p + 1) * ld + d] : 0;
      dst[p * D + d] = lo | hi << 16;
    }
}

/* As lc_flash_forward, on bf16 q, k, v and a bf16 output (lse fp32). Returns 0, or 1 when a buffer could not
   be allocated. Key blocks of BKF: twice the backward's, so the per-row work of each block (two horizontal
   reductions, a scalar exp, the output's rescaling) is spread over twice the keys: a 4096-token SmolLM2
   prefill chunk (9 query heads of 64 on 3 key heads, 1024 queries after 3072 cached keys), 2 Zen 5 cores:
   465 -> 500 GFLOP/s at 192, the same at 256 and 384, and at 64-192 query rows. */
#ifndef BKF
#define BKF 192
#endif
int lc_flash_forward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o, float *lse,
                          int64_t B, int64_t H, int64_t Hk, int64_t Lq, int64_t Lk, int64_t hd, const int64_t *qs,
                          const int64_t *ks, const int64_t *vs, const int64_t *os, int64_t q_offset, int causal,
                          float scale, int nthreads) {
  int64_t G = H / Hk, nqb = (Lq + BQ - 1) / BQ, nkb = (Lk + BKF - 1) / BKF, hp = hd / 2, Lk2 = nkb * BKF;
  /* per (b, kv head): K^T blocked by BKF as [block][hd / 2][BKF] words (a word: k[c][2p], k[c][2p + 1], adjacent
     in a row of k already), and V as [Lk2 / 2][hd] words (v[2p][d], v[2p + 1][d]); zero past Lk */
  uint32_t *KT = aligned_alloc(64, B * Hk * nkb * hp * BKF * 4), *VP = aligned_alloc(64, B * Hk * Lk2 / 2 * hd * 4);
  if (!KT || !VP) {
    free(KT), free(VP);
    return 1;
  }
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < B * Hk * nkb; t++) {
    int64_t bh = t / nkb, j = t % nkb, b = bh / Hk, h = bh % Hk, j0 = j * BKF;
    pack_pairs_t(k + b * ks[0] + h * ks[1] + j0 * ks[2], ks[2], Lk - j0, BKF, hd, KT + t * hp * BKF, BKF);
  }
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < B * Hk * Lk2 / 2; t++) {
    int64_t bh = t / (Lk2 / 2), p = t % (Lk2 / 2), b = bh / Hk, h = bh % Hk;
    pack_pairs_rows(v + b * vs[0] + h * vs[1] + 2 * p * vs[2], vs[2], Lk - 2 * p, 1, hd, VP + t * hd);
  }
  int failed = 0;
  int64_t ntask = B * H * nqb;
#pragma omp parallel num_threads(nthreads)
  {
    float *S = falloc(BQ * BKF), *O = falloc(BQ * hd), *m = falloc(BQ), *l = falloc(BQ);
    uint16_t *QB = aligned_alloc(64, BQ * hd * 2), *PB = aligned_alloc(64, BQ * BKF * 2);
    int ok = S && O && m && l && QB && PB;
    if (!ok) failed = 1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; t++) {
      if (!ok) continue;
      int64_t qb = nqb - 1 - t % nqb, bh = t / nqb, b = bh / H, h = bh % H, kh = h / G;
      int64_t i0 = qb * BQ, M = Lq - i0 < BQ ? Lq - i0 : BQ;
      for (int64_t r = 0; r < M; r++) memcpy(QB + r * hd, q + b * qs[0] + h * qs[1] + (i0 + r) * qs[2], 2 * hd);
      const uint32_t *Vb = VP + (b * Hk + kh) * (Lk2 / 2) * hd;
      int64_t last = causal ? q_offset + i0 + M - 1 : Lk - 1; /* last key any row here sees */
      if (last > Lk - 1) last = Lk - 1;
      for (int64_t r = 0; r < M; r++) m[r] = -INFINITY, l[r] = 0.0f;
      memset(O, 0, sizeof(float) * M * hd);
      for (int64_t j = 0; j * BKF <= last; j++) {
        int64_t j0 = j * BKF, cols = Lk - j0 < BKF ? Lk - j0 : BKF, n32 = ROUND32(cols);
        gemm_bf16(M, n32, hp, QB, hd, KT + ((b * Hk + kh) * nkb + j) * hp * BKF, BKF, S, BKF, 0);
        online_softmax(S, BKF, M, cols, n32, causal ? q_offset + i0 - j0 : INT64_MAX / 2, scale, m, l, O, hd);
        for (int64_t r = 0; r < M; r++) to_bf16_row(S + r * BKF, PB + r * BKF, n32);
        gemm_bf16(M, hd, n32 / 2, PB, BKF, Vb + j0 / 2 * hd, hd, O, hd, 1);
      }
      for (int64_t r = 0; r < M; r++) {
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int64_t d = 0; d < hd; d++) O[r * hd + d] *= inv;
        to_bf16_row(O + r * hd, o + b * os[0] + h * os[1] + (i0 + r) * os[2], hd);
        lse[(b * H + h) * Lq + i0 + r] = l[r] > 0.0f ? m[r] + logf(l[r]) : INFINITY;
      }
    }
    free(S), free(O), free(m), free(l), free(QB), free(PB);
  }
  free(KT), free(VP);
  return failed;
}
/* bf16 rows S[2p][:N], S[2p + 1][:N] of an fp32 matrix (row stride ld; rows past n zero) rounded to bf16 and
   paired: dst[p * ld + i] = (S[2p][i], S[2p + 1][i]) for p < npairs, N % 16 == 0 (dS^T as dQ's B operand) */
static void pack_pairs_rows_f32(const float *S, int64_t ld, int64_t n, int64_t npairs, int64_t N, uint32_t *dst) {
  for (int64_t p = 0; p < npairs; p++)
    for (int64_t i = 0; i < N; i += 16) {
      __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(S + 2 * p * ld + i)));
      __m512i hi = 2 * p + 1 < n
                       ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(S + (2 * p + 1) * ld + i)))
                       : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + p * ld + i, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}

/* As lc_flash_backward, on bf16 q, k, v, o, dout (lse fp32 from lc_flash_forward_bf16) into bf16 dq, dk, dv.
   The five block products are bf16 with fp32 accumulation; what they multiply is rounded to bf16 once: P for
   dV = P^T dO, dS for dK = dS^T Q and dQ = dS K (FlashAttention-2's bf16 backward does the same). The
   probabilities, D = rowsum(dO o) and dS are fp32; dK, dV and dQ accumulate in fp32 over all their blocks
   and are rounded to bf16 once. One task per (batch, key head) as in fp32, its K, V, K^T packed once; per
   query block Q and dO in both pair layouts. hd % 32 == 0. Returns 0, or 1 when a buffer could not be
   allocated. */
int lc_flash_backward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *o,
                           const uint16_t *dout, const float *lse, uint16_t *dq, uint16_t *dk, uint16_t *dv,
                           int64_t B, int64_t H, int64_t Hk, int64_t Lq, int64_t Lk, int64_t hd, const int64_t *qs,
                           const int64_t *ks, const int64_t *vs, const int64_t *os, const int64_t *dos,
                           const int64_t *dqs, const int64_t *dks, const int64_t *dvs, int64_t q_offset, int causal,
                           float scale, int nthreads) {
  int64_t G = H / Hk, nqb = (Lq + BQ - 1) / BQ, nkb = (Lk + BK - 1) / BK, hp = hd / 2, Lk2 = nkb * BK;
  if (nthreads > B * Hk) nthreads = (int)(B * Hk); /* no buffers for threads without a task */
  int failed = 0;
#pragma omp parallel num_threads(nthreads)
  {
    uint16_t *KR = aligned_alloc(64, Lk2 * hd * 2), *VR = aligned_alloc(64, Lk2 * hd * 2);
    uint16_t *KTb = aligned_alloc(64, hd * Lk2 * 2), *PB = aligned_alloc(64, BK * BQ * 2);
    float *dKf = falloc(Lk * hd), *dVf = falloc(Lk * hd), *P = falloc(BK * BQ), *dP = falloc(BK * BQ);
    float *dQT = falloc(hd * BQ), *dQR = falloc(BQ * hd), *Dv = falloc(BQ);
    uint32_t *QT = aligned_alloc(64, hp * BQ * 4), *dOT = aligned_alloc(64, hp * BQ * 4);
    uint32_t *QP = aligned_alloc(64, BQ / 2 * hd * 4), *dOP = aligned_alloc(64, BQ / 2 * hd * 4);
    uint32_t *dSP = aligned_alloc(64, BK / 2 * BQ * 4);
    int ok = KR && VR && KTb && PB && dKf && dVf && P && dP && dQT && dQR && Dv && QT && dOT && QP && dOP && dSP;
    if (!ok) failed = 1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < B * Hk; t++) {
      if (!ok) continue;
      int64_t b = t / Hk, kh = t % Hk;
      const uint16_t *K = k + b * ks[0] + kh * ks[1], *V = v + b * vs[0] + kh * vs[1];
      uint16_t *dK = dk + b * dks[0] + kh * dks[1], *dV = dv + b * dvs[0] + kh * dvs[1];
      for (int64_t j = 0; j < Lk; j++) {
        memcpy(KR + j * hd, K + j * ks[2], 2 * hd);
        memcpy(VR + j * hd, V + j * vs[2], 2 * hd);
      }
      for (int64_t d = 0; d < hd; d++) /* K^T, keys past Lk zero (dQ's products read whole pairs of keys) */
        for (int64_t j = 0; j < Lk2; j++) KTb[d * Lk2 + j] = j < Lk ? K[j * ks[2] + d] : 0;
      memset(dKf, 0, sizeof(float) * Lk * hd);
      memset(dVf, 0, sizeof(float) * Lk * hd);
      for (int64_t h = kh * G; h < (kh + 1) * G; h++) {
        const uint16_t *Q = q + b * qs[0] + h * qs[1], *dO = dout + b * dos[0] + h * dos[1];
        const uint16_t *O = o + b * os[0] + h * os[1];
        const float *LSE = lse + (b * H + h) * Lq;
        uint16_t *dQ = dq + b * dqs[0] + h * dqs[1];
        for (int64_t i = 0; i < nqb; i++) {
          int64_t i0 = i * BQ, M = Lq - i0 < BQ ? Lq - i0 : BQ, n32 = ROUND32(M), mp = (M + 1) / 2;
          pack_pairs_t(Q + i0 * qs[2], qs[2], M, n32, hd, QT, BQ);
          pack_pairs_t(dO + i0 * dos[2], dos[2], M, n32, hd, dOT, BQ);
          pack_pairs_rows(Q + i0 * qs[2], qs[2], M, mp, hd, QP);
          pack_pairs_rows(dO + i0 * dos[2], dos[2], M, mp, hd, dOP);
          for (int64_t r = 0; r < n32; r++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t d = 0; r < M && d < hd; d += 16)
              a = _mm512_fmadd_ps(ps_from_bf16x16(dO + (i0 + r) * dos[2] + d), ps_from_bf16x16(O + (i0 + r) * os[2] + d), a);
            Dv[r] = _mm512_reduce_add_ps(a);
          }
          memset(dQT, 0, sizeof(float) * hd * BQ);
          int64_t last = causal ? q_offset + i0 + M - 1 : Lk - 1; /* key blocks some query here sees */
          if (last > Lk - 1) last = Lk - 1;
          for (int64_t j = 0; j * BK <= last; j++) {
            int64_t j0 = j * BK, cols = Lk - j0 < BK ? Lk - j0 : BK, cp = (cols + 1) / 2;
            /* S^T (cols x n32) = K_j . Q_i^T, then P^T = exp(scale S^T - lse) */
            gemm_bf16(cols, n32, hp, KR + j0 * hd, hd, QT, BQ, P, BQ, 0);
            int diag = causal && j0 + cols - 1 > q_offset + i0;
            const __m512 sv = _mm512_set1_ps(scale);
            for (int64_t c = 0; c < cols; c++) {
              float *p = P + c * BQ;
              int64_t r0 = 0; /* the first query row that sees key j0 + c */
              if (diag) {
                int64_t f = j0 + c - q_offset - i0;
                r0 = f < 0 ? 0 : (f > n32 ? n32 : f);
              }
              /* 16 rows at a time, masked to the rows [r0, M) (zero elsewhere; LSE read only there) */
              for (int64_t r = 0; r < n32; r += 16) {
                int64_t lo = r0 - r < 0 ? 0 : (r0 - r > 16 ? 16 : r0 - r), hi = M - r < 0 ? 0 : (M - r > 16 ? 16 : M - r);
                __mmask16 live = lo < hi ? (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1)) : 0;
                __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(p + r), sv, _mm512_maskz_loadu_ps(live, LSE + i0 + r));
                _mm512_storeu_ps(p + r, _mm512_maskz_mov_ps(live, exp16(x)));
              }
              to_bf16_row(p, PB + c * BQ, n32);
            }
            /* dV_j += P^T . dO_i */
            gemm_bf16(cols, hd, mp, PB, BQ, dOP, hd, dVf + j0 * hd, hd, 1);
            /* dP^T (cols x n32) = V_j . dO_i^T; dS^T = P^T * (dP^T - D) * scale */
            gemm_bf16(cols, n32, hp, VR + j0 * hd, hd, dOT, BQ, dP, BQ, 0);
            for (int64_t c = 0; c < cols; c++) {
              float *p = P + c * BQ, *dp = dP + c * BQ;
              for (int64_t r = 0; r < n32; r += 16) {
                __m512 x = _mm512_sub_ps(_mm512_loadu_ps(dp + r), _mm512_loadu_ps(Dv + r));
                _mm512_storeu_ps(p + r, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(p + r), x), sv));
              }
              to_bf16_row(p, PB + c * BQ, n32);
            }
            /* dK_j += dS^T . Q_i;  dQ_i^T += K_j^T . dS^T */
            gemm_bf16(cols, hd, mp, PB, BQ, QP, hd, dKf + j0 * hd, hd, 1);
            pack_pairs_rows_f32(P, BQ, cols, cp, n32, dSP);
            gemm_bf16(hd, n32, cp, KTb + j0, Lk2, dSP, BQ, dQT, BQ, 1);
          }
          for (int64_t r = 0; r < M; r++) {
            for (int64_t d = 0; d < hd; d++) dQR[r * hd + d] = dQT[d * BQ + r];
            to_bf16_row(dQR + r * hd, dQ + (i0 + r) * dqs[2], hd);
          }
        }
      }
      for (int64_t j = 0; j < Lk; j++) {
        to_bf16_row(dKf + j * hd, dK + j * dks[2], hd);
        to_bf16_row(dVf + j * hd, dV + j * dvs[2], hd);
      }
    }
    free(KR), free(VR), free(KTb), free(PB), free(dKf), free(dVf), free(P), free(dP), free(dQT), free(dQR);
    free(Dv), free(QT), free(dOT), free(QP), free(dOP), free(dSP);
  }
  return failed;
}
#endif
