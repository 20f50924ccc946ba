// int4 weight x int8 activation linear for CPUs: AVX2 (optionally AVX-VNNI or AVX512-VNNI), NEON
// (optionally dotprod) and portable C++, chosen at run time. Built on first use by
// awqtensor/ops/cpu_kernel.py; no torch headers, so it compiles in about a second.
//
// Weight layout "cpu_blocks" (awqtensor/packing.py), per output row n, per group g:
//     float scale, float scale * zero,                      8 bytes
//     nb = ceil(group_size / 32) blocks of 16 bytes:       byte i of a block holds
//         column i in its low nibble and column i + 16 in its high nibble.
// so row n is G * (8 + 16 nb) bytes, one sequential stream of headers and codes.
//
// Activations are quantized per row and per block of 32 columns to int8 (absmax / 127,
// llama.cpp's Q8_0 idea), after multiplying by act_scale. With codes q (0..15):
//     y[m, n] = sum_g scale_g * sum_b dx_b * <q_b, xq_b>  -  sum_g (scale * zero)_g * xsum_g
//     xsum_g  = sum_b dx_b * sum(xq_b)     (the quantized x, so the zero point cancels exactly)
// <q_b, xq_b> is an exact int32 dot product (u8 x s8: maddubs/vpdpbusd or sdot).
//
// Every output element is computed by the same instruction sequence whatever M, N or
// the thread count: results are batch invariant, bit for bit.
//
// Non-finite activations: int8 cannot hold NaN or inf (and NaN's conversion to an integer is
// undefined), so the quantizer flags any row where a value does not land in [-127, 127]
// (NaN, +-inf, or an absmax so small that 1 / d overflows), and those rows are computed
// again by exact_row: the dequantized weight in fp32 arithmetic, NaN and inf propagating
// as in F.linear. The check costs a compare per block; finite rows never take it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define AWQ_X86 1
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#define AWQ_ARM 1
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#endif

enum Isa { SCALAR = 0, AVX2 = 1, AVX2_VNNI = 2, NEON = 3, NEON_DOTPROD = 4, AVX512_VNNI = 5 };
// The x86 paths that share the AVX2 code for everything but the dot products.
static inline bool avx2_family(int isa) { return isa == AVX2 || isa == AVX2_VNNI || isa == AVX512_VNNI; }
enum Dtype { F32 = 0, BF16 = 1, F16 = 2 };
// Output rows per tile: they share each activation load. 8 rather than 4: on a 2-core AMD
// EPYC, M = 1 single-threaded, 1.25-1.35x faster with the AVX512-VNNI path (3072x576 42 ->
// 31 us, 4096x4096 290 -> 230 us; AVX2 paths no slower), from half the per-tile overhead
// and twice the independent accumulator chains. Each row's arithmetic does not depend on it.
static const int kRows = 8;

// ---- dtype conversion (activations, act_scale, bias and output share one dtype) ----

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// IEEE half precision in software (only M x K and M x N elements pass through here):
// no compiler's _Float16 support needed.
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);            // inf, NaN
    else if (exp) u = sign | ((exp + 112u) << 23) | (man << 13);      // normal
    else if (!man) u = sign;                                          // zero
    else {                                                            // subnormal: exact in fp32
        float f = (float)man * 5.9604644775390625e-8f;                // man * 2^-24
        return sign ? -f : f;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_f16(float f) {  // round to nearest even
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;                       // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00u;                      // rounds to inf
    if (a < 0x38800000u) {                                            // subnormal or zero
        const float v = std::fabs(f) * 16777216.0f;                   // units of 2^-24
        return sign | (uint16_t)std::nearbyint(v);
    }
    uint32_t r = a - 0x38000000u;                                     // rebias exponent 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);
    return sign | (uint16_t)(r >> 13);
}

static inline float load_elem(const void* p, int64_t i, int dtype) {
    if (dtype == F32) return ((const float*)p)[i];
    if (dtype == BF16) return bf16_to_f32(((const uint16_t*)p)[i]);
    return f16_to_f32(((const uint16_t*)p)[i]);
}

static inline void store_elem(void* p, int64_t i, int dtype, float v) {
    if (dtype == F32) ((float*)p)[i] = v;
    else if (dtype == BF16) ((uint16_t*)p)[i] = f32_to_bf16(v);
    else ((uint16_t*)p)[i] = f32_to_f16(v);
}

// ---- activation quantization: x [K] -> xq [G * nb * 32], dx [G * nb], xsum [G] ----

// One block of up to 32 columns [c, c + n) -> 32 int8 (zero-padded); returns sum(xq).
// *bad is set when a value does not quantize (NaN, inf: see exact_row).
static int quantize_block_scalar(const void* x, const void* act_scale, int64_t c, int n, int dtype,
                                 int8_t* out, float* d_out, bool* bad) {
    float v[32];
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) {
        float f = 0.0f;
        if (i < n) {
            f = load_elem(x, c + i, dtype);
            if (act_scale) f *= load_elem(act_scale, c + i, dtype);
        }
        v[i] = f;
        amax = std::fmax(amax, std::fabs(f));
    }
    const float d = amax / 127.0f;
    const float inv = d > 0.0f ? 1.0f / d : 0.0f;
    int isum = 0;
    for (int i = 0; i < 32; ++i) {
        const float r = std::nearbyint(v[i] * inv);  // ties to even, as cvtps2dq does
        const bool fits = std::fabs(r) <= 127.0f;    // false for NaN
        *bad |= !fits;
        const int q = fits ? (int)r : 0;
        out[i] = (int8_t)q;
        isum += q;
    }
    *d_out = d;
    return isum;
}

#if AWQ_X86
#define AWQ_AVX2 __attribute__((target("avx2,fma,f16c")))

AWQ_AVX2 static inline __m256 load8_avx2(const void* p, int64_t i, int dtype) {
    if (dtype == F32) return _mm256_loadu_ps((const float*)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
    if (dtype == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

// A full block of 32 columns, the same arithmetic as quantize_block_scalar (bit for bit
// on finite inputs): fp32 products, absmax, x * (1 / d) rounded to nearest even. A value
// that does not quantize converts to INT_MIN (NaN, inf) or below -127, and saturates to
// -128, which finite values never reach (|x * (1 / d)| <= 127.0001 whenever 1 / d is finite).
AWQ_AVX2 static int quantize_block_avx2(const void* x, const void* act_scale, int64_t c, int dtype,
                                        int8_t* out, float* d_out, bool* bad) {
    __m256 v[4];
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
        v[j] = load8_avx2(x, c + 8 * j, dtype);
        if (act_scale) v[j] = _mm256_mul_ps(v[j], load8_avx2(act_scale, c + 8 * j, dtype));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float d = _mm_cvtss_f32(h) / 127.0f;
    const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    // packs works per 128-bit lane; the permute puts the 4-byte runs back in column order
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    *bad |= _mm256_movemask_epi8(_mm256_cmpeq_epi8(packed, _mm256_set1_epi8(-128))) != 0;
    _mm256_storeu_si256((__m256i*)out,
                        _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    *d_out = d;
    return _mm_cvtsi128_si32(t);
}
#endif

// Returns true when the row holds a value int8 cannot represent (see exact_row).
static bool quantize_row(const void* x, int dtype, const void* act_scale, int64_t K, int64_t G,
                         int64_t group_size, int64_t nb, bool vector, int8_t* xq, float* dx, float* xsum) {
    bool bad = false;
    for (int64_t g = 0; g < G; ++g) {
        float sum = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t start = g * group_size + b * 32;
            const int64_t group_end = g * group_size + group_size;
            const int64_t end = group_end < K ? group_end : K;
            const int n = end - start >= 32 ? 32 : (end > start ? (int)(end - start) : 0);
            int8_t* out = xq + (g * nb + b) * 32;
            float* d = dx + g * nb + b;
            int isum;
#if AWQ_X86
            if (vector && n == 32) isum = quantize_block_avx2(x, act_scale, start, dtype, out, d, &bad);
            else
#endif
                isum = quantize_block_scalar(x, act_scale, start, n, dtype, out, d, &bad);
            sum += *d * (float)isum;
            if (vector && (b & 1)) {  // pair (b - 1, b): [A0-15 A16-31 B0-15 B16-31] -> [A0-15 B0-15 A16-31 B16-31]
                int8_t tmp[16];
                std::memcpy(tmp, out - 16, 16);
                std::memcpy(out - 16, out, 16);
                std::memcpy(out, tmp, 16);
            }
        }
        xsum[g] = sum;
    }
    return bad;
}

// ---- dot products: R rows of one tile against one quantized activation row ----
// w[r] points at row r's bytes; the result is sum_g scale * sum_b dx_b <q, xq>, and
// corr[r] collects sum_g (scale * zero) * xsum_g.

static inline void group_header(const uint8_t* group, float* scale, float* scaled_zero) {
    std::memcpy(scale, group, 4);
    std::memcpy(scaled_zero, group + 4, 4);
}

// The zero point a header stands for: its scale * zero over its scale, rounded (exact for
// the integers 0..15 in fp32).
static inline int zero_of(float s, float sz) { return s != 0.0f ? (int)std::nearbyint(sz / s) : 0; }

template <int R, int MB>
static void rows_scalar(const uint8_t* const* w, int64_t G, int64_t nb, const int8_t* const* xqs,
                        const float* const* dxs, const float* const* xsums, float* out) {
    static_assert(MB == 1, "one activation row at a time");
    const int8_t* xq = xqs[0];
    const float *dx = dxs[0], *xsum = xsums[0];
    const int64_t group_bytes = 8 + 16 * nb;
    for (int r = 0; r < R; ++r) {
        float acc = 0.0f, corr = 0.0f;
        for (int64_t g = 0; g < G; ++g) {
            const uint8_t* grp = w[r] + g * group_bytes;
            float gacc = 0.0f;
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t* codes = grp + 8 + 16 * b;
                const int8_t* xb = xq + (g * nb + b) * 32;
                int32_t dot = 0;
                for (int i = 0; i < 16; ++i)
                    dot += (codes[i] & 15) * xb[i] + (codes[i] >> 4) * xb[i + 16];
                gacc += dx[g * nb + b] * (float)dot;
            }
            float scale, scaled_zero;
            group_header(grp, &scale, &scaled_zero);
            acc += scale * gacc;
            corr += scaled_zero * xsum[g];
        }
        out[r] = acc - corr;
    }
}

#if AWQ_X86
#define AWQ_AVX2_VNNI __attribute__((target("avx2,fma,f16c,avxvnni")))

// u8 codes x s8 activations, summed per 4 bytes into int32 lanes; "vnni" fuses the
// maddubs/madd pair (and cannot saturate). Both are exact for |q x| <= 15 * 127.
AWQ_AVX2 static inline __m256i dot_pair_avx2(__m256i lo, __m256i x1, __m256i hi, __m256i x2) {
    const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x1), _mm256_maddubs_epi16(hi, x2));
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
}
AWQ_AVX2_VNNI static inline __m256i dot_pair_vnni(__m256i lo, __m256i x1, __m256i hi, __m256i x2) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, x1), hi, x2);
}

// The sum of 8 lanes, in one fixed order (the 512-bit path sums each half with it too).
AWQ_AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// R weight rows x MB activation rows: each 32-byte load of codes is unpacked once and
// used MB times. Activations arrive pair-permuted (quantize_row's `vector` layout), so a
// pair of blocks is two plain loads. Per output, the arithmetic is the same whatever R, MB.
#define AWQ_ROWS_X86(NAME, TARGET, DOT)                                                          \
    template <int R, int MB>                                                                     \
    TARGET static void NAME(const uint8_t* const* w, int64_t G, int64_t nb, const int8_t* const* xq, \
                            const float* const* dx, const float* const* xsum, float* out) {      \
        const int64_t group_bytes = 8 + 16 * nb;                                                 \
        const int64_t ahead = kRows * G * group_bytes; /* the same bytes of the next tile's rows */ \
        const __m256i mask = _mm256_set1_epi8(0x0f);                                             \
        __m256 acc[MB][R];                                                                       \
        float corr[MB][R];                                                                       \
        for (int i = 0; i < MB; ++i)                                                             \
            for (int r = 0; r < R; ++r) { acc[i][r] = _mm256_setzero_ps(); corr[i][r] = 0.0f; }  \
        for (int64_t g = 0; g < G; ++g) {                                                        \
            __m256 gacc[MB][R];                                                                  \
            for (int i = 0; i < MB; ++i)                                                         \
                for (int r = 0; r < R; ++r) gacc[i][r] = _mm256_setzero_ps();                    \
            int64_t b = 0;                                                                       \
            for (; b + 2 <= nb; b += 2) { /* two blocks: one 32-byte load of codes per row */    \
                __m256 d[MB];                                                                    \
                for (int i = 0; i < MB; ++i) {                                                   \
                    const float* dg = dx[i] + g * nb + b;                                        \
                    d[i] = _mm256_set_m128(_mm_set1_ps(dg[1]), _mm_set1_ps(dg[0]));              \
                }                                                                                \
                for (int r = 0; r < R; ++r) {                                                    \
                    const uint8_t* at = w[r] + g * group_bytes + 8 + 16 * b;                     \
                    _mm_prefetch((const char*)(at + ahead), _MM_HINT_T0);                         \
                    const __m256i v = _mm256_loadu_si256((const __m256i*)at);                    \
                    const __m256i lo = _mm256_and_si256(v, mask);                                \
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);          \
                    for (int i = 0; i < MB; ++i) {                                               \
                        const int8_t* xp = xq[i] + (g * nb + b) * 32;                            \
                        const __m256i x1 = _mm256_loadu_si256((const __m256i*)xp);               \
                        const __m256i x2 = _mm256_loadu_si256((const __m256i*)(xp + 32));        \
                        gacc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(lo, x1, hi, x2)), d[i], gacc[i][r]); \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
            if (b < nb) { /* an odd block: its 16 bytes widened to 32 codes in column order */   \
                const __m256i zero = _mm256_setzero_si256();                                     \
                for (int r = 0; r < R; ++r) {                                                    \
                    const __m128i v = _mm_loadu_si128((const __m128i*)(w[r] + g * group_bytes + 8 + 16 * b)); \
                    const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), mask); \
                    for (int i = 0; i < MB; ++i) {                                               \
                        const __m256i xa = _mm256_loadu_si256((const __m256i*)(xq[i] + (g * nb + b) * 32)); \
                        const __m256 d = _mm256_set1_ps(dx[i][g * nb + b]);                      \
                        gacc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(q, xa, zero, zero)), d, gacc[i][r]); \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
            for (int r = 0; r < R; ++r) {                                                        \
                float scale, scaled_zero;                                                        \
                group_header(w[r] + g * group_bytes, &scale, &scaled_zero);                      \
                const __m256 s = _mm256_set1_ps(scale);                                          \
                for (int i = 0; i < MB; ++i) {                                                   \
                    acc[i][r] = _mm256_fmadd_ps(gacc[i][r], s, acc[i][r]);                       \
                    corr[i][r] += scaled_zero * xsum[i][g];                                      \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int i = 0; i < MB; ++i)                                                             \
            for (int r = 0; r < R; ++r) {                                                        \
                out[i * R + r] = hsum8(acc[i][r]) - corr[i][r];                                  \
            }                                                                                    \
    }

AWQ_ROWS_X86(rows_avx2, AWQ_AVX2, dot_pair_avx2)
AWQ_ROWS_X86(rows_vnni, AWQ_AVX2_VNNI, dot_pair_vnni)

// AVX-512: two weight rows per 512-bit register, one in each 256-bit half, against the
// same activations in both halves. Each half does exactly what rows_vnni does for its row
// (the same lanes, operations and order; the EVEX vpdpbusd computes what the VEX one
// does), so the results are bit-identical to avx2_vnni's: only the instruction count
// per weight byte halves. Single rows (tile remainders) use the 256-bit code.
#define AWQ_AVX512_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

AWQ_AVX512_VNNI static inline __m256i dot_pair_vnni512(__m256i lo, __m256i x1, __m256i hi, __m256i x2) {
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, x1), hi, x2);
}
AWQ_ROWS_X86(rows_vnni256, AWQ_AVX512_VNNI, dot_pair_vnni512)

AWQ_AVX512_VNNI static inline __m512 halves_ps(__m256 low, __m256 high) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(low)), _mm256_castps_pd(high), 1));
}
AWQ_AVX512_VNNI static inline __m512i halves_si(__m256i low, __m256i high) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}
AWQ_AVX512_VNNI static inline __m512i dot_pair_zmm(__m512i lo, __m512i x1, __m512i hi, __m512i x2) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x1), hi, x2);
}

template <int R, int MB>
AWQ_AVX512_VNNI static void rows_zmm(const uint8_t* const* w, int64_t G, int64_t nb, const int8_t* const* xq,
                                     const float* const* dx, const float* const* xsum, float* out) {
    static_assert(R % 2 == 0, "weight rows in pairs");
    constexpr int P = R / 2;
    const int64_t group_bytes = 8 + 16 * nb;
    const int64_t ahead = kRows * G * group_bytes;  // the same bytes of the next tile's rows
    const __m512i mask = _mm512_set1_epi8(0x0f);
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[MB][P];
    float corr[MB][R];
    for (int i = 0; i < MB; ++i) {
        for (int p = 0; p < P; ++p) acc[i][p] = _mm512_setzero_ps();
        for (int r = 0; r < R; ++r) corr[i][r] = 0.0f;
    }
    for (int64_t g = 0; g < G; ++g) {
        __m512 gacc[MB][P];
        for (int i = 0; i < MB; ++i)
            for (int p = 0; p < P; ++p) gacc[i][p] = _mm512_setzero_ps();
        int64_t b = 0;
        for (; b + 2 <= nb; b += 2) {  // two blocks: 32 bytes of codes per row
            __m512 d[MB];
            __m512i x1[MB], x2[MB];
            for (int i = 0; i < MB; ++i) {
                const float* dg = dx[i] + g * nb + b;
                const __m256 d256 = _mm256_set_m128(_mm_set1_ps(dg[1]), _mm_set1_ps(dg[0]));
                d[i] = halves_ps(d256, d256);
                const int8_t* xp = xq[i] + (g * nb + b) * 32;
                x1[i] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)xp));
                x2[i] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(xp + 32)));
            }
            for (int p = 0; p < P; ++p) {
                const uint8_t* a0 = w[2 * p] + g * group_bytes + 8 + 16 * b;
                const uint8_t* a1 = w[2 * p + 1] + g * group_bytes + 8 + 16 * b;
                _mm_prefetch((const char*)(a0 + ahead), _MM_HINT_T0);
                _mm_prefetch((const char*)(a1 + ahead), _MM_HINT_T0);
                const __m512i v = halves_si(_mm256_loadu_si256((const __m256i*)a0), _mm256_loadu_si256((const __m256i*)a1));
                const __m512i lo = _mm512_and_si512(v, mask);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                for (int i = 0; i < MB; ++i)
                    gacc[i][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_pair_zmm(lo, x1[i], hi, x2[i])), d[i], gacc[i][p]);
            }
        }
        if (b < nb) {  // an odd block: its 16 bytes widened to 32 codes in column order
            for (int p = 0; p < P; ++p) {
                __m256i q[2];
                for (int h = 0; h < 2; ++h) {
                    const __m128i v = _mm_loadu_si128((const __m128i*)(w[2 * p + h] + g * group_bytes + 8 + 16 * b));
                    q[h] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm512_castsi512_si256(mask));
                }
                const __m512i codes = halves_si(q[0], q[1]);
                for (int i = 0; i < MB; ++i) {
                    const __m512i xa = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(xq[i] + (g * nb + b) * 32)));
                    const __m512 dd = _mm512_set1_ps(dx[i][g * nb + b]);
                    gacc[i][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_pair_zmm(codes, xa, zero, zero)), dd, gacc[i][p]);
                }
            }
        }
        for (int p = 0; p < P; ++p) {
            float scale[2], scaled_zero[2];
            group_header(w[2 * p] + g * group_bytes, &scale[0], &scaled_zero[0]);
            group_header(w[2 * p + 1] + g * group_bytes, &scale[1], &scaled_zero[1]);
            const __m512 s = halves_ps(_mm256_set1_ps(scale[0]), _mm256_set1_ps(scale[1]));
            for (int i = 0; i < MB; ++i) {
                acc[i][p] = _mm512_fmadd_ps(gacc[i][p], s, acc[i][p]);
                corr[i][2 * p] += scaled_zero[0] * xsum[i][g];
                corr[i][2 * p + 1] += scaled_zero[1] * xsum[i][g];
            }
        }
    }
    for (int i = 0; i < MB; ++i)
        for (int p = 0; p < P; ++p)
            for (int h = 0; h < 2; ++h) {  // the 256-bit path's horizontal sum, per half
                const __m256 a = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i][p]), h));
                out[i * R + 2 * p + h] = hsum8(a) - corr[i][2 * p + h];
            }
}
#endif  // AWQ_X86

#if AWQ_ARM
// <16 codes, 16 activations> into 4 int32 lanes; both paths are exact.
static inline int32x4_t dot16_neon(int32x4_t acc, uint8x16_t q, int8x16_t x) {
    const int8x16_t qs = vreinterpretq_s8_u8(q);
    int16x8_t p = vmull_s8(vget_low_s8(qs), vget_low_s8(x));
    p = vmlal_s8(p, vget_high_s8(qs), vget_high_s8(x));
    return vpadalq_s16(acc, p);
}
__attribute__((target("arch=armv8.2-a+dotprod"))) static inline int32x4_t dot16_dotprod(int32x4_t acc, uint8x16_t q, int8x16_t x) {
    return vdotq_s32(acc, vreinterpretq_s8_u8(q), x);
}

#define AWQ_ROWS_ARM(NAME, TARGET, DOT)                                                          \
    template <int R, int MB>                                                                     \
    TARGET static void NAME(const uint8_t* const* w, int64_t G, int64_t nb, const int8_t* const* xqs, \
                            const float* const* dxs, const float* const* xsums, float* out) {    \
        static_assert(MB == 1, "one activation row at a time");                                  \
        const int8_t* xq = xqs[0];                                                               \
        const float *dx = dxs[0], *xsum = xsums[0];                                              \
        const int64_t group_bytes = 8 + 16 * nb;                                                 \
        const uint8x16_t mask = vdupq_n_u8(0x0f);                                                \
        float32x4_t acc[R];                                                                      \
        float corr[R];                                                                           \
        for (int r = 0; r < R; ++r) { acc[r] = vdupq_n_f32(0.0f); corr[r] = 0.0f; }              \
        for (int64_t g = 0; g < G; ++g) {                                                        \
            float32x4_t gacc[R];                                                                 \
            for (int r = 0; r < R; ++r) gacc[r] = vdupq_n_f32(0.0f);                             \
            for (int64_t b = 0; b < nb; ++b) {                                                   \
                const int8_t* xb = xq + (g * nb + b) * 32;                                       \
                const int8x16_t x1 = vld1q_s8(xb), x2 = vld1q_s8(xb + 16);                       \
                for (int r = 0; r < R; ++r) {                                                    \
                    const uint8x16_t v = vld1q_u8(w[r] + g * group_bytes + 8 + 16 * b);          \
                    int32x4_t s = DOT(vdupq_n_s32(0), vandq_u8(v, mask), x1);                    \
                    s = DOT(s, vshrq_n_u8(v, 4), x2);                                            \
                    gacc[r] = vfmaq_n_f32(gacc[r], vcvtq_f32_s32(s), dx[g * nb + b]);            \
                }                                                                                \
            }                                                                                    \
            for (int r = 0; r < R; ++r) {                                                        \
                float scale, scaled_zero;                                                        \
                group_header(w[r] + g * group_bytes, &scale, &scaled_zero);                      \
                acc[r] = vfmaq_n_f32(acc[r], gacc[r], scale);                                    \
                corr[r] += scaled_zero * xsum[g];                                                \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < R; ++r) out[r] = vaddvq_f32(acc[r]) - corr[r];                       \
    }

AWQ_ROWS_ARM(rows_neon, , dot16_neon)
AWQ_ROWS_ARM(rows_dotprod, __attribute__((target("arch=armv8.2-a+dotprod"))), dot16_dotprod)
#endif  // AWQ_ARM

// ---- dequantization: rows of W to a dense [N, K] matrix (fp32 or bf16) ----
// w = (q - zero) * scale: one rounding (q - zero is a small integer), the same on every
// path, and exactly 0 where q == zero, as the canonical weight is (an fma with the header's
// rounded scale * zero left a residue there, so that inf * w gave +-inf where F.linear on
// the weight gives NaN).

// The first `count` columns of one group (header and blocks) to out[at, at + count).
static void dequantize_group_scalar(const uint8_t* group, int64_t count, int dtype, void* out, int64_t at) {
    float scale, scaled_zero;
    group_header(group, &scale, &scaled_zero);
    const int zero = zero_of(scale, scaled_zero);
    for (int64_t j = 0; j < count; ++j) {
        const uint8_t byte = group[8 + (j / 32) * 16 + j % 16];
        const int q = (j % 32) < 16 ? (byte & 15) : (byte >> 4);
        store_elem(out, at + j, dtype, (float)(q - zero) * scale);
    }
}

static int64_t group_columns(int64_t g, int64_t K, int64_t group_size) {  // the last group may be cut by K
    return std::min(group_size, K - g * group_size);
}

// ---- rows the int8 path cannot take (NaN or inf in the activations) ----
// out[n] = sum_k x[k] * w[n, k] over the dequantized weight (w as above), fp32 products
// summed in column order: NaN and inf propagate as through F.linear on the dense weight
// (inf * w is +-inf by w's sign, NaN where w is exactly 0 or where +inf and -inf meet).
// x [K] is already times act_scale. Plain loops: only rows holding NaN or inf come here.
static void exact_row(const float* x, int64_t K, const uint8_t* w, int64_t N, int64_t G, int64_t group_size,
                      float* out) {
    const int64_t nb = (group_size + 31) / 32, group_bytes = 8 + 16 * nb;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t n = 0; n < N; ++n) {
        float acc = 0.0f;
        for (int64_t g = 0; g < G; ++g) {
            const uint8_t* group = w + (n * G + g) * group_bytes;
            float scale, scaled_zero;
            group_header(group, &scale, &scaled_zero);
            const int zero = zero_of(scale, scaled_zero);
            const int64_t count = group_columns(g, K, group_size);
            for (int64_t j = 0; j < count; ++j) {
                const uint8_t byte = group[8 + (j / 32) * 16 + j % 16];
                const int q = (j % 32) < 16 ? (byte & 15) : (byte >> 4);
                acc += x[g * group_size + j] * ((float)(q - zero) * scale);
            }
        }
        out[n] = acc;
    }
}

static void dequantize_row_scalar(const uint8_t* row, int64_t K, int64_t G, int64_t group_size, int64_t nb,
                                  int dtype, void* out, int64_t offset) {
    for (int64_t g = 0; g < G; ++g)
        dequantize_group_scalar(row + g * (8 + 16 * nb), group_columns(g, K, group_size), dtype, out,
                                offset + g * group_size);
}

#if AWQ_X86
// 8 fp32 -> 8 bf16 in the low halves of 32-bit lanes, rounded to nearest even (weights are finite)
AWQ_AVX2 static inline __m256i f32x8_to_bf16_lanes(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
}

AWQ_AVX2 static void dequantize_row_avx2(const uint8_t* row, int64_t K, int64_t G, int64_t group_size, int64_t nb,
                                         int dtype, void* out, int64_t offset) {
    const int64_t group_bytes = 8 + 16 * nb;
    const __m128i mask = _mm_set1_epi8(0x0f);
    for (int64_t g = 0; g < G; ++g) {
        const int64_t start = g * group_size;
        if (start + nb * 32 > K || group_size % 32) {  // a group cut by K, or not whole blocks
            dequantize_group_scalar(row + g * group_bytes, group_columns(g, K, group_size), dtype, out, offset + start);
            continue;
        }
        float scale, scaled_zero;
        group_header(row + g * group_bytes, &scale, &scaled_zero);
        const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps((float)zero_of(scale, scaled_zero));
        if (dtype == F32) {
            for (int64_t b = 0; b < nb; ++b) {
                const __m128i v = _mm_loadu_si128((const __m128i*)(row + g * group_bytes + 8 + 16 * b));
                const __m128i half[2] = {_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16(v, 4), mask)};
                for (int j = 0; j < 4; ++j) {  // columns 8j .. 8j + 7 of the block
                    const __m128i bytes = j & 1 ? _mm_srli_si128(half[j / 2], 8) : half[j / 2];
                    const __m256 q = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), z);
                    _mm256_storeu_ps((float*)out + offset + start + 32 * b + 8 * j, _mm256_mul_ps(q, s));
                }
            }
            continue;
        }
        // bf16: the group's 16 possible values, their low and high bytes looked up by code
        const __m256 q0 = _mm256_sub_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), z);  // q - zero, q = 0..7
        const __m256 q1 = _mm256_sub_ps(_mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), z);
        const __m256i r0 = f32x8_to_bf16_lanes(_mm256_mul_ps(q0, s)), r1 = f32x8_to_bf16_lanes(_mm256_mul_ps(q1, s));
        const __m256i values = _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), 0xd8);  // 16 x u16, in order
        const __m256i split = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(values, _mm256_setr_epi8(
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15)), 0xd8);
        const __m256i low = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(split));
        const __m256i high = _mm256_broadcastsi128_si256(_mm256_extracti128_si256(split, 1));
        for (int64_t b = 0; b < nb; ++b) {
            const __m128i v = _mm_loadu_si128((const __m128i*)(row + g * group_bytes + 8 + 16 * b));
            const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
            const __m256i lo = _mm256_shuffle_epi8(low, codes), hi = _mm256_shuffle_epi8(high, codes);
            const __m256i a = _mm256_unpacklo_epi8(lo, hi), c = _mm256_unpackhi_epi8(lo, hi);  // columns 0-7|16-23, 8-15|24-31
            uint16_t* dst = (uint16_t*)out + offset + start + 32 * b;
            _mm256_storeu_si256((__m256i*)dst, _mm256_permute2x128_si256(a, c, 0x20));
            _mm256_storeu_si256((__m256i*)(dst + 16), _mm256_permute2x128_si256(a, c, 0x31));
        }
    }
}

// One row of x (times act_scale) rounded to bf16, 8 columns at a time; returns how many
// columns it did (awq_cpu_to_bf16 does the rest). Activations may hold NaN: rounding would
// carry a NaN's payload into the exponent (to inf, or to -0), so NaNs are kept quiet NaNs,
// as f32_to_bf16 keeps them.
AWQ_AVX2 static int64_t to_bf16_row_avx2(const void* x, int64_t offset, int64_t K, int dtype, const void* act_scale,
                                         uint16_t* out) {
    int64_t c = 0;
    for (; c + 8 <= K; c += 8) {
        __m256 v = load8_avx2(x, offset + c, dtype);
        if (act_scale) v = _mm256_mul_ps(v, load8_avx2(act_scale, c, dtype));
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x40));
        const __m256i r = _mm256_blendv_epi8(f32x8_to_bf16_lanes(v), quiet, nan);
        _mm_storeu_si128((__m128i*)(out + offset + c),
                         _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    }
    return c;
}
#endif

typedef void (*RowsFn)(const uint8_t* const*, int64_t, int64_t, const int8_t* const*, const float* const*,
                       const float* const*, float*);

struct Kernels {
    RowsFn tile, one;            // kRows weight rows, 1 weight row; one activation row
    RowsFn tile_pair, one_pair;  // the same for two activation rows, or null
};

static bool pick(int isa, Kernels* k) {
    *k = Kernels{nullptr, nullptr, nullptr, nullptr};
    switch (isa) {
        case SCALAR: *k = {rows_scalar<kRows, 1>, rows_scalar<1, 1>, nullptr, nullptr}; return true;
#if AWQ_X86
        case AVX2: *k = {rows_avx2<kRows, 1>, rows_avx2<1, 1>, rows_avx2<kRows / 2, 2>, rows_avx2<1, 2>}; return true;
        case AVX2_VNNI: *k = {rows_vnni<kRows, 1>, rows_vnni<1, 1>, rows_vnni<kRows / 2, 2>, rows_vnni<1, 2>}; return true;
        case AVX512_VNNI:
            *k = {rows_zmm<kRows, 1>, rows_vnni256<1, 1>, rows_zmm<kRows / 2, 2>, rows_vnni256<1, 2>};
            return true;
#endif
#if AWQ_ARM
        case NEON: *k = {rows_neon<kRows, 1>, rows_neon<1, 1>, nullptr, nullptr}; return true;
        case NEON_DOTPROD: *k = {rows_dotprod<kRows, 1>, rows_dotprod<1, 1>, nullptr, nullptr}; return true;
#endif
        default: return false;
    }
}

extern "C" {

// 1 if this CPU can run `isa` (and this build has it), else 0.
int awq_cpu_isa_supported(int isa) {
    switch (isa) {
        case SCALAR: return 1;
#if AWQ_X86
        case AVX2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        case AVX2_VNNI: return awq_cpu_isa_supported(AVX2) && __builtin_cpu_supports("avxvnni");
        case AVX512_VNNI:
            return awq_cpu_isa_supported(AVX2) && __builtin_cpu_supports("avx512f") &&
                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512vnni");
#endif
#if AWQ_ARM
        case NEON: return 1;
#if defined(__linux__)
        case NEON_DOTPROD: return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) ? 1 : 0;
#endif
#endif
        default: return 0;
    }
}

// The fastest path this CPU runs.
int awq_cpu_best_isa(void) {
    static const int order[] = {AVX512_VNNI, AVX2_VNNI, AVX2, NEON_DOTPROD, NEON, SCALAR};
    for (int isa : order)
        if (awq_cpu_isa_supported(isa)) return isa;
    return SCALAR;
}

// One call's operands, shared by the threads.
struct Problem {
    Kernels k;
    const void *x, *act_scale, *bias;
    void* y;
    const uint8_t* w;
    int64_t M, K, N, G, group_size, nb, row_bytes, x_stride;
    int dtype;
    bool pair_permuted;  // the x86 kernels read pairs of blocks
    int8_t* xq;
    float *dx, *xsum;
    uint8_t* bad;  // [M]: rows that hold NaN or inf, recomputed by exact_row
};

static void quantize_rows(const Problem& p, int64_t m) {
    p.bad[m] = quantize_row((const char*)p.x + m * p.K * (p.dtype == F32 ? 4 : 2), p.dtype, p.act_scale, p.K, p.G,
                            p.group_size, p.nb, p.pair_permuted, p.xq + m * p.x_stride, p.dx + m * p.G * p.nb,
                            p.xsum + m * p.G);
}

// Output row m again through exact_row (the int8 path's result there is meaningless).
// Returns 0, or -2 when out of memory.
static int recompute_row(const Problem& p, int64_t m) {
    float* buffer = (float*)std::malloc(sizeof(float) * (size_t)(p.K + p.N));
    if (!buffer) return -2;
    float *xr = buffer, *out = buffer + p.K;
    for (int64_t c = 0; c < p.K; ++c)
        xr[c] = load_elem(p.x, m * p.K + c, p.dtype) * (p.act_scale ? load_elem(p.act_scale, c, p.dtype) : 1.0f);
    exact_row(xr, p.K, p.w, p.N, p.G, p.group_size, out);
    for (int64_t n = 0; n < p.N; ++n)
        store_elem(p.y, m * p.N + n, p.dtype, out[n] + (p.bias ? load_elem(p.bias, n, p.dtype) : 0.0f));
    std::free(buffer);
    return 0;
}

// Output rows [kRows t, kRows (t + 1)) for every activation row.
static void run_tile(const Problem& p, int64_t t) {
    const Kernels& k = p.k;
    const int64_t n0 = t * kRows, G = p.G, nb = p.nb;
    const int rows = (int)(p.N - n0 < kRows ? p.N - n0 : kRows);
    const uint8_t* rows_w[kRows];
    for (int r = 0; r < kRows; ++r) rows_w[r] = p.w + (n0 + (r < rows ? r : 0)) * p.row_bytes;
    float out[2 * kRows];
    for (int64_t m = 0; m < p.M;) {
        const int mb = (k.tile_pair && m + 1 < p.M) ? 2 : 1;
        const int8_t* xm[2] = {p.xq + m * p.x_stride, p.xq + (m + mb - 1) * p.x_stride};
        const float* dm[2] = {p.dx + m * G * nb, p.dx + (m + mb - 1) * G * nb};
        const float* sm[2] = {p.xsum + m * G, p.xsum + (m + mb - 1) * G};
        if (mb == 2) {  // out[i * R + r] for R = kRows / 2, then for the second half of the tile
            if (rows == kRows) {
                float half[2][kRows];
                k.tile_pair(rows_w, G, nb, xm, dm, sm, half[0]);
                k.tile_pair(rows_w + kRows / 2, G, nb, xm, dm, sm, half[1]);
                for (int i = 0; i < 2; ++i)
                    for (int r = 0; r < kRows; ++r) out[i * kRows + r] = half[r / (kRows / 2)][i * (kRows / 2) + r % (kRows / 2)];
            } else {
                for (int r = 0; r < rows; ++r) {
                    float two[2];
                    k.one_pair(rows_w + r, G, nb, xm, dm, sm, two);
                    out[r] = two[0];
                    out[kRows + r] = two[1];
                }
            }
        } else if (rows == kRows) {
            k.tile(rows_w, G, nb, xm, dm, sm, out);
        } else {
            for (int r = 0; r < rows; ++r) k.one(rows_w + r, G, nb, xm, dm, sm, out + r);
        }
        for (int i = 0; i < mb; ++i)
            for (int r = 0; r < rows; ++r) {
                float v = out[i * kRows + r];
                if (p.bias) v += load_elem(p.bias, n0 + r, p.dtype);
                store_elem(p.y, (m + i) * p.N + n0 + r, p.dtype, v);
            }
        m += mb;
    }
}

// y[M, N] = x[M, K] (times act_scale) @ W.T + bias, W in the "cpu_blocks" layout with G
// groups of group_size columns. x, act_scale, bias and y share `dtype`; act_scale and
// bias may be NULL. Returns 0, or -1 for an unknown isa/dtype, -2 when out of memory.
// The sizes are trusted: the callers check them against the tensors (cpu_op.cpp,
// cpu_kernel.py).
int awq_cpu_linear(const void* x, int64_t M, int64_t K, int dtype, const uint8_t* w, int64_t N,
                   int64_t G, int64_t group_size, const void* act_scale, const void* bias,
                   void* y, int isa) {
    Problem p;
    if (dtype < F32 || dtype > F16 || !pick(isa, &p.k) || !awq_cpu_isa_supported(isa)) return -1;
    p.x = x; p.act_scale = act_scale; p.bias = bias; p.y = y; p.w = w;
    p.M = M; p.K = K; p.N = N; p.G = G; p.group_size = group_size; p.dtype = dtype;
    p.nb = (group_size + 31) / 32;
    p.row_bytes = G * (8 + 16 * p.nb);
    p.x_stride = G * p.nb * 32;
    p.pair_permuted = p.k.tile_pair != nullptr;
    p.xq = (int8_t*)std::malloc((size_t)(M * p.x_stride) + 64);
    p.dx = (float*)std::malloc(sizeof(float) * (size_t)(M * G * p.nb + M * G) + (size_t)M);
    if (!p.xq || !p.dx) { std::free(p.xq); std::free(p.dx); return -2; }
    p.xsum = p.dx + M * G * p.nb;
    p.bad = (uint8_t*)(p.xsum + M * G);

    // Small problems stay on this thread, without even entering an OpenMP region.
    if (M * K >= 65536) {
#pragma omp parallel for schedule(static)
        for (int64_t m = 0; m < M; ++m) quantize_rows(p, m);
    } else {
        for (int64_t m = 0; m < M; ++m) quantize_rows(p, m);
    }
    const int64_t tiles = (N + kRows - 1) / kRows;
    if (M * N * K >= (1 << 16)) {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) run_tile(p, t);
    } else {
        for (int64_t t = 0; t < tiles; ++t) run_tile(p, t);
    }
    int rc = 0;
    for (int64_t m = 0; m < M && !rc; ++m)
        if (p.bad[m]) rc = recompute_row(p, m);
    std::free(p.xq);
    std::free(p.dx);
    return rc;
}

// out[N, K] (fp32 or bf16 per dtype; F16 is refused) = the weight W stands for. Returns 0,
// or -1 for an unknown isa/dtype.
int awq_cpu_dequantize(const uint8_t* w, int64_t N, int64_t K, int64_t G, int64_t group_size, int dtype,
                       void* out, int isa) {
    if ((dtype != F32 && dtype != BF16) || !awq_cpu_isa_supported(isa)) return -1;
    const int64_t nb = (group_size + 31) / 32, row_bytes = G * (8 + 16 * nb);
    void (*row_fn)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, int, void*, int64_t) = dequantize_row_scalar;
#if AWQ_X86
    if (avx2_family(isa)) row_fn = dequantize_row_avx2;
#endif
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t n = 0; n < N; ++n) row_fn(w + n * row_bytes, K, G, group_size, nb, dtype, out, n * K);
    return 0;
}

// out[M, K] (bf16) = x[M, K] (times act_scale[K]), each product rounded once; x and
// act_scale share `dtype`. Returns 0, or -1 for an unknown isa/dtype.
int awq_cpu_to_bf16(const void* x, int64_t M, int64_t K, int dtype, const void* act_scale, uint16_t* out, int isa) {
    if (dtype < F32 || dtype > F16 || !awq_cpu_isa_supported(isa)) return -1;
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
    for (int64_t m = 0; m < M; ++m) {
        int64_t c = 0;
#if AWQ_X86
        if (avx2_family(isa)) c = to_bf16_row_avx2(x, m * K, K, dtype, act_scale, out);
#endif
        for (; c < K; ++c) {  // the portable path, and the vector path's last columns
            const float v = load_elem(x, m * K + c, dtype) * (act_scale ? load_elem(act_scale, c, dtype) : 1.0f);
            out[m * K + c] = f32_to_bf16(v);
        }
    }
    return 0;
}

}  // extern "C"
