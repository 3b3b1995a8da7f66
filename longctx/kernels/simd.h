/* Helpers shared by the kernels of this folder: 8-wide AVX2 reductions and exp. */
#pragma once
#include <immintrin.h>
#include <stdint.h>

static inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

static inline float hmax8(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

/* the reduction's and the polynomial's constants, shared by exp8 and exp16 */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO (-2.12194440e-4f)
#define EXP_POLY(FMA, SET1, p, r)                                                                           \
  do {                                                                                                      \
    p = SET1(1.0f / 720.0f);                                                                                \
    p = FMA(p, r, SET1(1.0f / 120.0f));                                                                     \
    p = FMA(p, r, SET1(1.0f / 24.0f));                                                                      \
    p = FMA(p, r, SET1(1.0f / 6.0f));                                                                       \
    p = FMA(p, r, SET1(0.5f));                                                                              \
    p = FMA(p, r, SET1(1.0f));                                                                              \
    p = FMA(p, r, SET1(1.0f));                                                                              \
  } while (0)

/* ---- exp on 8 floats: exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2/2, degree-6 polynomial
   (Taylor terms; relative error ~1e-7, i.e. float rounding). Inputs are <= 0 here (scores minus their max);
   below -87 the result is flushed to 0, as the float exp underflows there anyway. */
static inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  /* r = x - n ln2, ln2 split in a high part exact in float and a low correction (Cody-Waite) */
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
  __m256 p;
  EXP_POLY(_mm256_fmadd_ps, _mm256_set1_ps, p, r);
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

#ifdef __AVX512F__
/* exp8 on 16 floats (the same reduction and polynomial) */
static inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
  __m512 p;
  EXP_POLY(_mm512_fmadd_ps, _mm512_set1_ps, p, r);
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps((__mmask16)~under, p, _mm512_castsi512_ps(e));
}
#endif

/* ---- bf16 <-> fp32 on 8 values with AVX2 alone (any build): widening is exact (bf16 is fp32's top half);
   narrowing rounds to nearest even, as torch's and vcvtneps2bf16 do, NaNs kept quiet NaNs */
static inline __m256 ps_from_bf16x8(const uint16_t *p) {
  __m128i h = _mm_loadu_si128((const __m128i *)p);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline void bf16x8_store(uint16_t *p, __m256 v) {
  __m256i x = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_srli_epi32(_mm256_blendv_epi8(r, _mm256_or_si256(x, _mm256_set1_epi32(0x400000)), nan), 16);
  /* eight 32-bit values < 2^16 to eight 16-bit: packus works per 128-bit lane, permute puts them in order */
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

#ifdef __AVX512F__
/* the same on 16 values with AVX-512F alone (no AVX512-BF16 needed) */
static inline __m512 ps_from_bf16x16(const uint16_t *p) {
  __m256i h = _mm256_loadu_si256((const __m256i *)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void bf16x16_store(uint16_t *p, __m512 v) {
  __m512i x = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(x, _mm512_set1_epi32(0x400000)));
  _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
#endif

static inline float f32_from_bf16(uint16_t h) {
  uint32_t w = (uint32_t)h << 16;
  float f;
  __builtin_memcpy(&f, &w, 4);
  return f;
}

static inline uint16_t bf16_from_f32(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, 4);
  if (f != f) return (uint16_t)((x | 0x400000) >> 16);
  return (uint16_t)((x + 0x7FFF + ((x >> 16) & 1)) >> 16);
}

