/* Weight-only quantized linear layers on x86-64 with AVX2/FMA/F16C (wrapped by longctx/infer/quant.py).

The weights are ggml's blocks, what a GGUF file holds:
  Q8_0  34 bytes per 32 weights: fp16 scale d, 32 int8 q            w = d * q
  Q4_0  18 bytes per 32 weights: fp16 d, 16 bytes of nibbles        w = d * (q - 8)
  Q4_1  20 bytes per 32 weights: fp16 d, fp16 m, 16 bytes           w = d * q + m
(nibbles: byte i holds weight i in its low half and weight i + 16 in its high half), with their bytes
reordered once at load so that eight rows are read side by side (quant.py's pack_x8; the layout below).
A tensor from a file keeps its bytes: no second rounding.

  lc_linear_q    y = x W^T + b for a few rows x: a decode step's matrix-vector products. Memory-bound, so
                 reading 1.06 (Q8_0) or 0.56-0.63 (Q4) bytes per weight instead of fp32's 4 is the speed-up;
                 the activations are rounded to int16 per block of 32 for integer dot products.
  lc_dequant_q   W -> fp32 rows, for prefill: a chunk of many rows is a GEMM, and dequantizing one matrix
                 (~0.07 ms for 1M weights, 2 threads) then calling MKL costs a few percent of the GEMM itself.

The arithmetic. Converting every weight to fp32 costs more instructions than the memory allows (measured:
6-14 GB/s). Instead each row of x is rounded once per call to int16 with one scale s per block of 32
(relative error <= 2^-16 of the block's largest value: ~500x below int8 weights' own rounding), and each
block's dot product is integer: the weights widened to int16, _mm256_madd_epi16 (16 products and pairwise
sums per instruction, exact in int32), one conversion to float, times s, and one FMA with the block's scale
d. The 4-bit formats read their nibbles unsigned (0..15: from 16 bytes widened to 16-bit lanes, the low
nibble masked, the high one shifted down) and take w = d q + m with m = -8 d (Q4_0) or the block's own m
(Q4_1), whose share m * sum(x) is one more FMA per block on the block sum of the same rounded x.

The layout. With ggml's blocks row after row, a block of a row ends in a horizontal sum, its scale is
broadcast alone, and Q4 cost ~13 instructions per 32 weights and row even with four rows sharing x:
compute-bound at ~16.5 GB/s on 2 Zen 3 cores, half the memory's bandwidth. With eight rows interleaved (as
llama.cpp's repacked Q4_0_8x8 is) a vector's eight 32-bit lanes are the eight rows: one madd multiplies a
pair of x values, broadcast, by that pair of weights in every row, a block's int32 sums need no reduction,
and the eight rows' scales come in one load: ~7 instructions per 32 weights and row (Q8_0 ~6). Measured on
SmolLM2's matrices x 30 layers (Zen 3, 2 threads): Q4_0 16.7 -> 21.1 GB/s, Q4_1 16.4 -> 23.0, Q8_0 (one
row at a time before) 20-25 -> 22-28. Per group of eight rows and block of 32 columns:
  8 fp16 d, (Q4_1) 8 fp16 m, then the weights as pairs of columns: 16 bytes per pair for the eight rows,
  byte 2 r + e of pair p being row r's weight 2 p + e. Q8_0: pairs p = 0..15, 256 bytes. Q4: 128 bytes,
  pair p = 0..7 in the low nibbles and pair p + 8 (weights 2 p + 16 + e) in the high ones;
272 (Q8_0), 144 (Q4_0) or 160 (Q4_1) bytes per 256 weights, ggml's bytes; N is padded to a multiple of
eight with zero rows.
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define Q8_0 0
#define Q4_0 1
#define Q4_1 2
#define QK 32

static inline int64_t group_bytes(int kind) { return kind == Q8_0 ? 272 : kind == Q4_0 ? 144 : 160; }
static inline int64_t scale_bytes(int kind) { return kind == Q4_1 ? 32 : 16; } /* d (and m) of 8 rows */

typedef struct {
  int16_t *xq; /* (M, K) the rounded rows */
  float *s;    /* (M, nb) each block's scale */
  float *sum;  /* (M, nb) 4-bit formats: the block's s * sum(xq), times -8 for Q4_0 */
} RoundedRows;

static void round_rows(const float *x, int64_t M, int64_t K, int kind, RoundedRows *out) {
  int64_t nb = K / QK;
  for (int64_t r = 0; r < M; r++)
    for (int64_t j = 0; j < nb; j++) {
      const float *xb = x + r * K + j * QK;
      __m256 a = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
      for (int c = 0; c < 4; c++) a = _mm256_max_ps(a, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8 * c)));
      float s = hmax8(a) / 32767.0f;
      out->s[r * nb + j] = s;
      __m256 inv = _mm256_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
      __m256i isum = _mm256_setzero_si256();
      for (int c = 0; c < 2; c++) {
        __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 16 * c), inv));
        __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 16 * c + 8), inv));
        /* packs works within 128-bit lanes: put the four 64-bit quarters back in order */
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
        _mm256_storeu_si256((__m256i *)(out->xq + r * K + j * QK + 16 * c), p);
        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
      }
      if (out->sum)
        out->sum[r * nb + j] = s * (float)hsum8(_mm256_cvtepi32_ps(isum)) * (kind == Q4_0 ? -8.0f : 1.0f);
    }
}

#define MAX_M 16
/* Software prefetch this many bytes ahead of the block being read, for the first row of x (1-4 KiB tried:
   the farthest was best, by 2-5%); prefetches past the end of W are hints that never fault. */
#define PREFETCH 4096
/* rows 8g .. 8g + 7 of y for every row of x: always inlined with a constant `kind`, one specialised loop
   per format (OpenMP outlines a parallel region before inlining, so the dispatch sits inside it) */
static inline __attribute__((always_inline)) void group_dot(const uint8_t *W, const int kind, const float *bias,
                                                            float *y, int64_t mm, int64_t N, int64_t K, int64_t g,
                                                            const RoundedRows *x) {
  const int64_t nb = K / QK, bb = group_bytes(kind);
  const uint8_t *w = W + g * nb * bb;
  const __m256i low = _mm256_set1_epi16(0x0F);
  for (int64_t r = 0; r < mm; r++) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; j++) {
      const uint8_t *b = w + j * bb, *q = b + scale_bytes(kind);
      const int16_t *xb = x->xq + r * K + j * QK;
      if (r == 0)
        for (int64_t c = 0; c < bb; c += 64) _mm_prefetch((const char *)(b + PREFETCH + c), _MM_HINT_T0);
      __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
      for (int p = 0; p < (kind == Q8_0 ? 16 : 8); p += kind == Q8_0 ? 2 : 1) {
        int32_t x0, x1; /* x's pair p, and pair p + 1 (Q8_0) or p + 8 (Q4), as two int16 */
        memcpy(&x0, xb + 2 * p, 4);
        if (kind == Q8_0) {
          memcpy(&x1, xb + 2 * p + 2, 4);
          __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16 * p)));
          __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16 * p + 16)));
          s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(w0, _mm256_set1_epi32(x0)));
          s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(w1, _mm256_set1_epi32(x1)));
        } else {
          memcpy(&x1, xb + 2 * p + 16, 4);
          __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + 16 * p)));
          s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_and_si256(v, low), _mm256_set1_epi32(x0)));
          s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_srli_epi16(v, 4), _mm256_set1_epi32(x1)));
        }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
      acc = _mm256_fmadd_ps(_mm256_mul_ps(dot, _mm256_broadcast_ss(x->s + r * nb + j)), d, acc);
      if (kind != Q8_0) { /* the offset's share: -8 d (Q4_0) or m (Q4_1) times the block sum of x */
        const __m256 m = kind == Q4_0 ? d : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16)));
        acc = _mm256_fmadd_ps(m, _mm256_broadcast_ss(x->sum + r * nb + j), acc);
      }
    }
    float out[8];
    _mm256_storeu_ps(out, acc);
    for (int64_t i = 0; i < 8 && 8 * g + i < N; i++) y[r * N + 8 * g + i] = out[i] + (bias ? bias[8 * g + i] : 0.0f);
  }
}

void lc_linear_q(const float *x, const uint8_t *W, int kind, const float *bias, float *y, int64_t M, int64_t N,
                 int64_t K, int nthreads) {
  const int64_t nb = K / QK;
  for (int64_t m0 = 0; m0 < M; m0 += MAX_M) { /* callers send <= 16 rows; more are done 16 at a time */
    int64_t mm = M - m0 < MAX_M ? M - m0 : MAX_M;
    RoundedRows rr = {malloc(mm * K * sizeof(int16_t)), malloc(mm * nb * sizeof(float)),
                      kind == Q8_0 ? NULL : malloc(mm * nb * sizeof(float))};
    round_rows(x + m0 * K, mm, K, kind, &rr);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < (N + 7) / 8; g++) {
      if (kind == Q8_0)
        group_dot(W, Q8_0, bias, y + m0 * N, mm, N, K, g, &rr);
      else if (kind == Q4_0)
        group_dot(W, Q4_0, bias, y + m0 * N, mm, N, K, g, &rr);
      else
        group_dot(W, Q4_1, bias, y + m0 * N, mm, N, K, g, &rr);
    }
    free(rr.xq), free(rr.s), free(rr.sum);
  }
}

/* ---- dequantization ------------------------------------------------------------------------------------ */
/* an 8 x 8 transpose of 16-bit elements: rows in, columns out */
static inline void transpose8x16(__m128i r[8]) {
  __m128i a[8], top[4], bottom[4]; /* a[2i], a[2i + 1]: rows 2i, 2i + 1 interleaved, columns 0-3 and 4-7 */
  for (int i = 0; i < 4; i++) {
    a[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int k = 0; k < 2; k++) { /* [p]: columns 2p, 2p + 1 of rows 0-3 (top) and 4-7 (bottom) */
    top[2 * k] = _mm_unpacklo_epi32(a[k], a[k + 2]);
    top[2 * k + 1] = _mm_unpackhi_epi32(a[k], a[k + 2]);
    bottom[2 * k] = _mm_unpacklo_epi32(a[k + 4], a[k + 6]);
    bottom[2 * k + 1] = _mm_unpackhi_epi32(a[k + 4], a[k + 6]);
  }
  for (int p = 0; p < 4; p++) {
    r[2 * p] = _mm_unpacklo_epi64(top[p], bottom[p]);
    r[2 * p + 1] = _mm_unpackhi_epi64(top[p], bottom[p]);
  }
}

/* one group's block back to its rows (at most eight) of 32 floats, row r at out + r * ld */
static void dequant_block(const uint8_t *b, int kind, float *out, int64_t ld, int rows) {
  const uint8_t *q = b + scale_bytes(kind);
  __m128i lo[8], hi[8]; /* [p] 16-bit lanes r: row r's weights 2p, 2p + 1 (lo) and 2p + 16, 2p + 17 (hi) */
  for (int p = 0; p < 8; p++) {
    if (kind == Q8_0) {
      lo[p] = _mm_loadu_si128((const __m128i *)(q + 16 * p));
      hi[p] = _mm_loadu_si128((const __m128i *)(q + 16 * (p + 8)));
    } else {
      __m128i v = _mm_loadu_si128((const __m128i *)(q + 16 * p));
      lo[p] = _mm_and_si128(v, _mm_set1_epi8(0x0F));
      hi[p] = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
    }
  }
  transpose8x16(lo), transpose8x16(hi); /* now [r]: row r's weights 0..15 and 16..31 as bytes */
  float d[8], m[8] = {0};
  _mm256_storeu_ps(d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b)));
  if (kind == Q4_1) _mm256_storeu_ps(m, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16))));
  for (int r = 0; r < rows; r++) {
    __m256 dv = _mm256_set1_ps(d[r]), mv = _mm256_set1_ps(kind == Q4_0 ? -8.0f * d[r] : m[r]);
    __m128i bytes[2] = {lo[r], hi[r]};
    for (int c = 0; c < 4; c++) {
      __m128i e = c & 1 ? _mm_srli_si128(bytes[c / 2], 8) : bytes[c / 2];
      __m256i i32 = kind == Q8_0 ? _mm256_cvtepi8_epi32(e) : _mm256_cvtepu8_epi32(e);
      _mm256_storeu_ps(out + r * ld + 8 * c, _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), dv, mv));
    }
  }
}

void lc_dequant_q(const uint8_t *W, int kind, float *out, int64_t N, int64_t K, int nthreads) {
  const int64_t nb = K / QK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t g = 0; g < (N + 7) / 8; g++)
    for (int64_t j = 0; j < nb; j++)
      dequant_block(W + (g * nb + j) * group_bytes(kind), kind, out + 8 * g * K + j * QK, K,
                    N - 8 * g < 8 ? (int)(N - 8 * g) : 8);
}
