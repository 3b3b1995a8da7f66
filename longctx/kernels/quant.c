/* Weight-only quantized linear layers on x86-64 with AVX2/FMA/F16C (wrapped by longctx/infer/quant.py).

The weights stay in ggml's block formats, byte for byte what a GGUF file holds, so a Q8_0/Q4_0/Q4_1 tensor
read from a file keeps its bytes (4-bit ones reordered for decode, below) and one quantized here can be
written back:
  Q8_0  34 bytes per 32 weights: fp16 scale d, 32 int8 q            w = d * q
  Q4_0  18 bytes per 32 weights: fp16 d, 16 bytes of nibbles        w = d * (q - 8)
  Q4_1  20 bytes per 32 weights: fp16 d, fp16 m, 16 bytes           w = d * q + m
(nibbles: byte i holds weight i in its low half and weight i + 16 in its high half.)

  lc_linear_q    y = x W^T + b for a few rows x: a decode step's matrix-vector products. Memory-bound, so
                 reading 1.06 (Q8_0) or 0.56-0.63 (Q4) bytes per weight instead of fp32's 4 is the speed-up;
                 the activations are rounded to int16 per block of 32 for integer dot products (below).
  lc_dequant_q   W -> fp32 rows, for prefill: a chunk of many rows is a GEMM, and dequantizing one matrix
                 (~1 ms for 1M weights) then calling MKL costs a few percent of the GEMM itself.

Q8_0 and the ggml-layout 4-bit formats run four rows of W at a time (one at a time for Q8_0 against one row
of x); decode's 4-bit weights come with rows interleaved by eight (Q4_0_X8, Q4_1_X8: the same bytes
rearranged, described before lc_linear_q). See the matrix-vector product below for the arithmetic.
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define Q8_0 0
#define Q4_0 1
#define Q4_1 2
#define Q4_0_X8 3 /* Q4_0 / Q4_1 with rows interleaved by eight: the decode layout below */
#define Q4_1_X8 4
#define QK 32

static inline int64_t block_bytes(int kind) { return kind == Q8_0 ? 34 : kind == Q4_0 ? 18 : 20; }

static inline float f16(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

/* 32 weights of one block as four vectors of 8 floats (before the scale): for dequantization */
static inline void load_q8(const uint8_t *q, __m256 w[4]) {
  for (int i = 0; i < 4; i++)
    w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i))));
}
/* a Q4 block's 32 nibbles as two vectors of 16 bytes (weights 0..15, 16..31), minus `offset` */
static inline void nibbles(const uint8_t *q, int offset, __m128i *lo, __m128i *hi) {
  __m128i v = _mm_loadu_si128((const __m128i *)q), m = _mm_set1_epi8(0x0F), o = _mm_set1_epi8((char)offset);
  *lo = _mm_sub_epi8(_mm_and_si128(v, m), o);
  *hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), m), o);
}
static inline void load_q4(const uint8_t *q, int offset, __m256 w[4]) {
  __m128i lo, hi;
  nibbles(q, offset, &lo, &hi);
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

/* the block's weights (before scaling) and its scale d and offset m */
static inline void load_block(const uint8_t *b, int kind, __m256 w[4], float *d, float *m) {
  *d = f16(b);
  *m = 0.0f;
  if (kind == Q8_0)
    load_q8(b + 2, w);
  else if (kind == Q4_0)
    load_q4(b + 2, 8, w);
  else {
    *m = f16(b + 2);
    load_q4(b + 4, 0, w);
  }
}

/* ---- the matrix-vector product -------------------------------------------------------------------------
   Converting every weight to fp32 costs more instructions than the memory allows (measured: 6-14 GB/s).
   Instead each row of x is rounded once per call to int16 with one scale s per block of 32 (relative error
   <= 2^-16 of the block's largest value: ~500x below int8 weights' own rounding), and each block's dot
   product is integer: the weights widened to int16, _mm256_madd_epi16 (16 products and pairwise sums per
   instruction, exact in int32), one conversion to float, times s, and one FMA with the block's scale d.
   The 4-bit formats read their nibbles unsigned (0..15: two instructions from 16 bytes widened to 16-bit
   lanes: the low nibble masked, the high one shifted down) and take w = d q + m with m = -8 d (Q4_0) or
   the block's own m (Q4_1), whose share m * sum(x) is one more FMA per block on the block sum of the same
   rounded x, kept in lane 0 of a vector. Per block and row that is ~13 instructions where subtracting 8
   from every nibble and converting scales one by one took ~19 (the kernel was compute-bound, below the
   bandwidth, on a 2-core AMD EPYC Zen 3). */
typedef struct {
  int16_t *xq;  /* (M, K) the rounded rows */
  __m256 *s;    /* (M, nb) each block's scale, in every lane */
  __m256 *sum;  /* (M, nb) 4-bit formats: the block's s * sum(xq) (times -8 for Q4_0) in lane 0, else 0 */
} RoundedRows;

static void round_rows(const float *x, int64_t M, int64_t K, int kind, RoundedRows *out) {
  int64_t nb = K / QK;
  for (int64_t r = 0; r < M; r++)
    for (int64_t j = 0; j < nb; j++) {
      const float *xb = x + r * K + j * QK;
      __m256 a = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
      for (int c = 0; c < 4; c++) a = _mm256_max_ps(a, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8 * c)));
      float s = hmax8(a) / 32767.0f;
      out->s[r * nb + j] = _mm256_set1_ps(s);
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
      if (out->sum) {
        float sum = s * (float)hsum8(_mm256_cvtepi32_ps(isum)) * (kind == Q4_0 ? -8.0f : 1.0f);
        out->sum[r * nb + j] = _mm256_setr_ps(sum, 0, 0, 0, 0, 0, 0, 0);
      }
    }
}

/* an fp16 number at p in every lane */
static inline __m256 f16x8(const uint8_t *p) {
  int16_t h;
  memcpy(&h, p, 2);
  return _mm256_cvtph_ps(_mm_set1_epi16(h));
}

/* the integer dot product of one block of weights (unsigned nibbles for Q4) with one block of x (int16)
   -> 8 int32 partial sums */
static inline __m256i block_dot(const uint8_t *b, int kind, const int16_t *xq) {
  __m256i lo, hi;
  if (kind == Q8_0) {
    lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 2)));
    hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 18)));
  } else {
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + (kind == Q4_0 ? 2 : 4))));
    lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
    hi = _mm256_srli_epi16(v, 4);
  }
  __m256i p = _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)xq));
  return _mm256_add_epi32(p, _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 16))));
}

#define ROWS 4
#define MAX_M 16
/* Software prefetch, PREFETCH rows of W ahead of the first row of x: the integer arithmetic per byte keeps
   the hardware prefetchers from running far enough ahead of a matrix that does not fit in cache (the LM
   head, 49152 x 576 Q8_0: measured 4.5-6.1 ms without, 2.4-3.2 ms with, AMD EPYC, 2 threads); prefetches
   past the end of W are hints that never fault. */
#define PREFETCH 8
/* rows n0 .. n0 + ROWS of y for every row of x: always inlined with a constant `kind`, one specialised loop
   per format (OpenMP outlines a parallel region before inlining, so the dispatch sits inside it) */
static inline __attribute__((always_inline)) void group_dot(const uint8_t *W, const int kind, const float *bias,
                                                            float *y, int64_t mm, int64_t N, int64_t K, int64_t n0,
                                                            const RoundedRows *x) {
  const int64_t nb = K / QK, bb = block_bytes(kind), rb = nb * bb, rows = N - n0 < ROWS ? N - n0 : ROWS;
  /* a short last group repeats its last row instead of reading past W (and drops it at the end) */
  const uint8_t *w[ROWS];
  for (int i = 0; i < ROWS; i++) w[i] = W + (n0 + (i < rows ? i : rows - 1)) * rb;
  for (int64_t r = 0; r < mm; r++) {
    __m256 acc[ROWS];
    for (int i = 0; i < ROWS; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; j++) {
      const int16_t *xb = x->xq + r * K + j * QK;
      const __m256 s = x->s[r * nb + j];
      for (int i = 0; i < ROWS; i++) {
        const uint8_t *b = w[i] + j * bb;
        if (r == 0) _mm_prefetch((const char *)(b + PREFETCH * rb), _MM_HINT_T0);
        __m256 d = f16x8(b);
        acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(block_dot(b, kind, xb)), s), d, acc[i]);
        if (kind == Q4_0) acc[i] = _mm256_fmadd_ps(d, x->sum[r * nb + j], acc[i]);
        if (kind == Q4_1) acc[i] = _mm256_fmadd_ps(f16x8(b + 2), x->sum[r * nb + j], acc[i]);
      }
    }
    for (int i = 0; i < rows; i++) y[r * N + n0 + i] = hsum8(acc[i]) + (bias ? bias[n0 + i] : 0.0f);
  }
}

/* Q8_0 against one row of x (a decode step), one row of W at a time with its blocks streamed in order: 19 ->
   25 GB/s on SmolLM2's 30 layers of matrices (Zen 3, 2 threads, interleaved builds), the same sums in the
   same order as group_dot. The 4-bit formats stay in groups of rows: they are bound by the arithmetic per
   block, which the groups share (one row at a time: Q4_0 16.5 -> 12.5 GB/s). */
static void row_dot_q8(const uint8_t *W, const float *bias, float *y, int64_t N, int64_t K, const RoundedRows *x,
                       int nthreads) {
  const int64_t nb = K / QK, rb = nb * block_bytes(Q8_0);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t n = 0; n < N; n++) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; j++) {
      const uint8_t *b = W + n * rb + j * block_bytes(Q8_0);
      _mm_prefetch((const char *)(b + PREFETCH * rb), _MM_HINT_T0);
      acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(block_dot(b, Q8_0, x->xq + j * QK)), x->s[j]),
                            f16x8(b), acc);
    }
    y[n] = hsum8(acc) + (bias ? bias[n] : 0.0f);
  }
}

static void rows_dot(const uint8_t *W, int kind, const float *bias, float *y, int64_t mm, int64_t N, int64_t K,
                     const RoundedRows *x, int nthreads) {
  if (kind == Q8_0 && mm == 1) {
    row_dot_q8(W, bias, y, N, K, x, nthreads);
    return;
  }
  int64_t groups = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t g = 0; g < groups; g++) {
    if (kind == Q8_0)
      group_dot(W, Q8_0, bias, y, mm, N, K, ROWS * g, x);
    else if (kind == Q4_0)
      group_dot(W, Q4_0, bias, y, mm, N, K, ROWS * g, x);
    else
      group_dot(W, Q4_1, bias, y, mm, N, K, ROWS * g, x);
  }
}

/* ---- 4-bit weights with their rows interleaved by eight ------------------------------------------------
   Even sharing the arithmetic between four rows, Q4 blocks cost ~13 instructions per 32 weights and row
   (widen, mask, shift, two madd, add, convert, scale, broadcast d, two FMA): compute-bound at ~16.5 GB/s on
   2 Zen 3 cores, half the memory's bandwidth. With eight rows interleaved (as llama.cpp's repacked
   Q4_0_8x8 does) a vector's eight 32-bit lanes are the eight rows: one madd multiplies a pair of x values,
   broadcast, by that pair of weights in every row, the int32 sums of a block need no horizontal reduction,
   and the eight rows' scales come in one load: ~7 instructions per 32 weights and row.
   Layout, per group of eight rows and block of 32 columns (quant.py's pack_x8 writes it from ggml blocks):
     8 fp16 d, (Q4_1) 8 fp16 m, then 128 bytes: byte 16 h + 2 r + e holds, for row r, weight 2 h + e in its
     low nibble and weight 2 h + 16 + e in its high one (h = 0..7, e = 0..1),
   144 (Q4_0) or 160 (Q4_1) bytes per 256 weights, the bytes of ggml's blocks; N is padded to a multiple of
   eight with zero rows. Widened to 16-bit lanes, 16 bytes are the pairs h (masked) and h + 8 (shifted) of
   all eight rows. The same sums as the ggml layout (int16 x, exact int32 block sums, one rounding to float
   per block and row), so the two agree up to float rounding. */
static inline int64_t x8_bytes(int kind) { return kind == Q4_0_X8 ? 144 : 160; }
#define X8_PREFETCH 4096 /* bytes ahead of the block being read (1-4 KiB tried: the farthest was best, by 2-5%) */

static inline __attribute__((always_inline)) void x8_group_dot(const uint8_t *W, const int kind,
                                                               const float *bias, float *y, int64_t mm,
                                                               int64_t N, int64_t K, int64_t g,
                                                               const RoundedRows *x) {
  const int64_t nb = K / QK, bb = x8_bytes(kind), head = kind == Q4_0_X8 ? 16 : 32;
  const uint8_t *w = W + g * nb * bb;
  const __m256i low = _mm256_set1_epi16(0x0F);
  for (int64_t r = 0; r < mm; r++) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; j++) {
      const uint8_t *b = w + j * bb;
      const int16_t *xb = x->xq + r * K + j * QK;
      if (r == 0)
        for (int64_t c = 0; c < bb; c += 64) _mm_prefetch((const char *)(b + X8_PREFETCH + c), _MM_HINT_T0);
      __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
      for (int h = 0; h < 8; h++) {
        __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + head + 16 * h)));
        int32_t lo, hi; /* x's pairs 2h, 2h + 1 and 2h + 16, 2h + 17 */
        memcpy(&lo, xb + 2 * h, 4);
        memcpy(&hi, xb + 2 * h + 16, 4);
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_and_si256(v, low), _mm256_set1_epi32(lo)));
        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_srli_epi16(v, 4), _mm256_set1_epi32(hi)));
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
      acc = _mm256_fmadd_ps(_mm256_mul_ps(dot, x->s[r * nb + j]), d, acc);
      /* the offset's share: -8 d (Q4_0) or m (Q4_1) times the block sum of x */
      const __m256 sum = _mm256_broadcastss_ps(_mm256_castps256_ps128(x->sum[r * nb + j]));
      acc = _mm256_fmadd_ps(kind == Q4_0_X8 ? d : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16))),
                            sum, acc);
    }
    float out[8];
    _mm256_storeu_ps(out, acc);
    for (int64_t i = 0; i < 8 && 8 * g + i < N; i++) y[r * N + 8 * g + i] = out[i] + (bias ? bias[8 * g + i] : 0.0f);
  }
}

static void x8_rows_dot(const uint8_t *W, int kind, const float *bias, float *y, int64_t mm, int64_t N,
                        int64_t K, const RoundedRows *x, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t g = 0; g < (N + 7) / 8; g++) {
    if (kind == Q4_0_X8)
      x8_group_dot(W, Q4_0_X8, bias, y, mm, N, K, g, x);
    else
      x8_group_dot(W, Q4_1_X8, bias, y, mm, N, K, g, x);
  }
}

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

/* one group's block back to eight rows of 32 floats (out: row r at out + r * ld) */
static void x8_dequant_block(const uint8_t *b, int kind, float *out, int64_t ld, int rows) {
  const int head = kind == Q4_0_X8 ? 16 : 32;
  __m128i lo[8], hi[8]; /* [h] 16-bit lanes r: row r's weights 2h, 2h + 1 (lo) and 2h + 16, 2h + 17 (hi) */
  for (int h = 0; h < 8; h++) {
    __m128i v = _mm_loadu_si128((const __m128i *)(b + head + 16 * h));
    lo[h] = _mm_and_si128(v, _mm_set1_epi8(0x0F));
    hi[h] = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
  }
  transpose8x16(lo), transpose8x16(hi); /* now [r]: row r's weights 0..15 and 16..31 as bytes */
  float d[8], m[8];
  _mm256_storeu_ps(d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b)));
  if (kind == Q4_1_X8)
    _mm256_storeu_ps(m, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16))));
  for (int r = 0; r < rows; r++) {
    __m256 dv = _mm256_set1_ps(d[r]), mv = _mm256_set1_ps(kind == Q4_1_X8 ? m[r] : -8.0f * d[r]);
    __m128i q[2] = {lo[r], hi[r]};
    for (int c = 0; c < 4; c++) {
      __m128i bytes = c & 1 ? _mm_srli_si128(q[c / 2], 8) : q[c / 2];
      __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
      _mm256_storeu_ps(out + r * ld + 8 * c, _mm256_fmadd_ps(w, dv, mv));
    }
  }
}

void lc_linear_q(const float *x, const uint8_t *W, int kind, const float *bias, float *y, int64_t M, int64_t N,
                 int64_t K, int nthreads) {
  const int64_t nb = K / QK;
  const int format = kind == Q4_0_X8 ? Q4_0 : kind == Q4_1_X8 ? Q4_1 : kind; /* the arithmetic's */
  for (int64_t m0 = 0; m0 < M; m0 += MAX_M) { /* callers send <= 16 rows; more are done 16 at a time */
    int64_t mm = M - m0 < MAX_M ? M - m0 : MAX_M;
    RoundedRows rr = {malloc(mm * K * sizeof(int16_t)), aligned_alloc(32, mm * nb * sizeof(__m256)),
                      format == Q8_0 ? NULL : aligned_alloc(32, mm * nb * sizeof(__m256))};
    round_rows(x + m0 * K, mm, K, format, &rr);
    if (kind >= Q4_0_X8)
      x8_rows_dot(W, kind, bias, y + m0 * N, mm, N, K, &rr, nthreads);
    else
      rows_dot(W, kind, bias, y + m0 * N, mm, N, K, &rr, nthreads);
    free(rr.xq), free(rr.s), free(rr.sum);
  }
}

void lc_dequant_q(const uint8_t *W, int kind, float *out, int64_t N, int64_t K, int nthreads) {
  int64_t nb = K / QK, bb = block_bytes(kind);
  if (kind >= Q4_0_X8) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < (N + 7) / 8; g++)
      for (int64_t j = 0; j < nb; j++)
        x8_dequant_block(W + (g * nb + j) * x8_bytes(kind), kind, out + 8 * g * K + j * QK, K,
                         N - 8 * g < 8 ? (int)(N - 8 * g) : 8);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t n = 0; n < N; n++) {
    for (int64_t j = 0; j < nb; j++) {
      __m256 w[4];
      float d, m;
      load_block(W + (n * nb + j) * bb, kind, w, &d, &m);
      __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
      for (int c = 0; c < 4; c++) _mm256_storeu_ps(out + n * K + j * QK + 8 * c, _mm256_fmadd_ps(w[c], dv, mv));
    }
  }
}
