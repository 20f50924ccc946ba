// awqtensor::w4a8_linear's CPU GEMM: int8 activations x int4 weights for prefill-sized M,
// included by cpu_op.cpp (after cpu_kernel.cpp, whose dtype helpers and ISA checks it uses).
//
// Arithmetic (the W4A8 format, awqtensor/ops/w4a8.py): per row m and weight group g,
// x' = x * act_scale is quantized to int8 with d[m, g] = absmax / 127,
// xq = round_half_even(x' * (1 / d)). With the weight's codes minus its zero point
// (q - z, -15..15) and its scale s (the "cpu_blocks" group header),
//     y[m, n] = sum_g fl(C_g[n, m] * (s[n, g] * d[m, g])),   C_g = <xq[m, g], (q - z)[n, g]>
// C_g is an exact int32; the sum is fp32 fmas in group order whatever the tile shape,
// thread count or micro-kernel: AMX, AVX512-VNNI, AVX2, NEON dotprod and scalar give
// bit-identical results (tests/test_w4a8.py, ARM64 under qemu). No torch headers: the
// ARM64 test cross-compiles it with tests/cpu_gemm_driver.cpp.
//
// The micro-kernels (one group's products per instruction set, and the rescale) are in
// cpu_gemm_micro.cpp; this file holds the format, the buffers and the driver.
//
// Layout per call: the activations once, as int8 in the "VNNI" order the dot products
// read (four consecutive k of one row per 32-bit lane, 16 rows per 64 bytes); per thread,
// a panel of 32 weight rows unpacked to one signed byte per code. The micro-kernel
// computes C[n][m] (32 x 32) for one group into an int32 buffer, then the rescale adds it
// into the fp32 accumulators. With AMX, C = A (codes, 16 x kc bytes) . B (activations)
// through TDPBSSD, 2 x 2 tiles. The per-group rescale costs about as much as AMX's dot
// products: at M ~ 512 torch's AMX-bf16 matmul (the weight-only dense route) catches up,
// and the switch (w4a8.py) sends those calls there.

#include <sys/syscall.h>
#include <unistd.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#include <vector>
#if AWQ_X86
#include <cpuid.h>
#endif

enum GemmKernel { GEMM_SCALAR = 0, GEMM_AVX2 = 1, GEMM_AVX512_VNNI = 2, GEMM_AMX = 3, GEMM_NEON_DOTPROD = 4 };
static const int kPanel = 32;  // weight rows (outputs) per panel, and activation rows per block

#if AWQ_X86
#define AWQ_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))

// AMX needs the kernel's permission for the tile data once per process (Linux >= 5.16).
static bool amx_usable() {
    static const bool ok = [] {
        unsigned a, b, c, d;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
        if (!awq_cpu_isa_supported(AVX512_VNNI)) return false;
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }();
    return ok;
}
#else
static bool amx_usable() { return false; }
#endif

static bool gemm_kernel_supported(int kernel) {
    switch (kernel) {
        case GEMM_SCALAR: return true;
#if AWQ_X86
        case GEMM_AVX2: return awq_cpu_isa_supported(AVX2);
        case GEMM_AVX512_VNNI: return awq_cpu_isa_supported(AVX512_VNNI);
        case GEMM_AMX: return amx_usable();
#endif
#if AWQ_ARM
        case GEMM_NEON_DOTPROD: return awq_cpu_isa_supported(NEON_DOTPROD);
#endif
        default: return false;
    }
}

static int gemm_best_kernel() {
    for (int k : {GEMM_AMX, GEMM_AVX512_VNNI, GEMM_AVX2, GEMM_NEON_DOTPROD})
        if (gemm_kernel_supported(k)) return k;
    return GEMM_SCALAR;
}

// ---- activations: x' [M, K] fp32 -> xv (VNNI order), d [G][Mp] ----

// One row's group [c, c + n) (n <= group_size, the rest of the group zero): int8 codes into
// q[0 .. group_size); *d_out = absmax / 127. Returns true when a value does not quantize
// (NaN, inf: the row is then recomputed by exact_row, as in cpu_kernel.cpp).
static bool quantize_group_scalar(const float* x, int64_t n, int64_t group_size, int8_t* q, float* d_out) {
    float amax = 0.0f;
    for (int64_t i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    const float d = amax / 127.0f;
    const float inv = d > 0.0f ? 1.0f / d : 0.0f;
    bool bad = false;
    for (int64_t i = 0; i < group_size; ++i) {
        const float r = i < n ? std::nearbyint(x[i] * inv) : 0.0f;
        const bool fits = std::fabs(r) <= 127.0f;  // false for NaN
        bad |= !fits;
        q[i] = (int8_t)(fits ? (int)r : 0);
    }
    *d_out = d;
    return bad;
}

#if AWQ_X86
// The same on whole groups (n == group_size, a multiple of 8), bit for bit: a value that
// does not quantize saturates to -128, which finite values never reach (cpu_kernel.cpp).
AWQ_AVX2 static bool quantize_group_avx2(const float* x, int64_t group_size, int8_t* q, float* d_out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int64_t i = 0; i < group_size; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    const float d = amax / 127.0f;
    const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    const __m128i lowest = _mm_set1_epi8(-128);
    __m128i bad = _mm_setzero_si128();
    for (int64_t i = 0; i < group_size; i += 8) {
        const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv));  // nearest even
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        const __m128i b = _mm_packs_epi16(w, w);
        bad = _mm_or_si128(bad, _mm_cmpeq_epi8(b, lowest));
        _mm_storel_epi64((__m128i*)(q + i), b);
    }
    *d_out = d;
    return _mm_movemask_epi8(bad) != 0;
}
#endif

// ---- the buffers' layouts: every AMX tile one contiguous KiB ----
// codes: a panel's 32 rows in chunks of kc columns, [Kp / kc][32][kc]; `codes` at row 0
// with row r's bytes at r * kc (unpack_row writes one row: pass code_at(buf, r, 0, kc)).
// xv: activations by blocks of 16 rows, [Mp / 16][Kp / 4][16][4].
// kc is 32 or 64: shifts, not divisions, in the inner loops.
static inline int64_t code_offset(int64_t n, int64_t k, int64_t kc) {
    const int shift = kc == 64 ? 6 : 5;
    return (((k >> shift) * kPanel + n) << shift) + (k & (kc - 1));
}
static inline int8_t* code_at(int8_t* codes, int64_t n, int64_t k, int64_t kc) { return codes + code_offset(n, k, kc); }
static inline const int8_t* code_at(const int8_t* codes, int64_t n, int64_t k, int64_t kc) {
    return codes + code_offset(n, k, kc);
}
static inline const int8_t* xv_at(const int8_t* xv, int64_t m, int64_t k4, int64_t Kp) {  // m a multiple of 16
    return xv + ((m / 16) * (Kp / 4) + k4) * 64;
}

// ---- weights: a row of the "cpu_blocks" layout -> one signed byte per code, q - zero ----
// codes [Kp] (-15..15), scale[g * stride], wsum[g * stride] = sum over the group of (q - zero).
// The zero point is the header's (zero_of, cpu_kernel.cpp).

static void unpack_row_scalar(const uint8_t* row, int64_t G, int64_t group_size, int64_t kc, int8_t* codes,
                              float* scale, int32_t* wsum, int64_t stride) {
    const int64_t nb = group_size / 32;
    for (int64_t g = 0; g < G; ++g) {
        const uint8_t* at = row + g * (8 + 16 * nb);
        float s, sz;
        std::memcpy(&s, at, 4);
        std::memcpy(&sz, at + 4, 4);
        const int z = zero_of(s, sz);
        int sum = 0;
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t* blk = at + 8 + 16 * b;
            int8_t* out = code_at(codes, 0, g * group_size + 32 * b, kc);
            for (int i = 0; i < 16; ++i) {
                out[i] = (int8_t)((blk[i] & 15) - z);
                out[16 + i] = (int8_t)((blk[i] >> 4) - z);
                sum += out[i] + out[16 + i];
            }
        }
        scale[g * stride] = s;
        wsum[g * stride] = sum;
    }
}

#if AWQ_X86
// A whole panel, group by group and row by row: the writes then run through the buffer in
// order (row by row, each group's 64 codes land 2 KiB apart and every store misses the
// cache: 2.3x slower standalone). Eight rows' headers at a time (one vector division for
// their zero points); the codes' sums only where a micro-kernel needs them (`wsum`
// non-null). The same values as unpack_row_scalar. rows <= 32 real rows at `w`.
AWQ_AVX2 static void unpack_panel_avx2(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t G, int64_t group_size,
                                       int64_t kc, int8_t* codes, float* scale, int32_t* wsum) {
    const int64_t nb = group_size / 32, group_bytes = 8 + 16 * nb;
    const __m128i low = _mm_set1_epi8(15);
    const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                               _mm256_set1_epi32((int)row_bytes));
    alignas(32) int32_t zeros[kPanel];
    for (int64_t g = 0; g < G; ++g) {
        const uint8_t* head = w + g * group_bytes;
        for (int64_t r0 = 0; r0 < kPanel; r0 += 8) {
            if (r0 + 8 <= rows && row_bytes * 8 < (int64_t(1) << 31)) {
                const __m256 sv = _mm256_i32gather_ps((const float*)(head + r0 * row_bytes), offsets, 1);
                const __m256 szv = _mm256_i32gather_ps((const float*)(head + r0 * row_bytes + 4), offsets, 1);
                const __m256 nonzero = _mm256_cmp_ps(sv, _mm256_setzero_ps(), _CMP_NEQ_OQ);
                const __m256 ratio = _mm256_and_ps(_mm256_div_ps(szv, sv), nonzero);
                _mm256_store_si256((__m256i*)(zeros + r0), _mm256_cvtps_epi32(ratio));  // nearest even
                _mm256_storeu_ps(scale + g * kPanel + r0, sv);
            } else {
                for (int64_t r = r0; r < r0 + 8; ++r) {
                    float sr = 0.0f, szr = 0.0f;
                    if (r < rows) {
                        std::memcpy(&sr, head + r * row_bytes, 4);
                        std::memcpy(&szr, head + r * row_bytes + 4, 4);
                    }
                    zeros[r] = zero_of(sr, szr);
                    scale[g * kPanel + r] = sr;
                }
            }
        }
        for (int64_t r = 0; r < kPanel; ++r) {
            __m256i total = _mm256_setzero_si256();
            for (int64_t b = 0; b < nb; ++b) {
                int8_t* out = code_at(codes, r, g * group_size + 32 * b, kc);
                if (r >= rows) {
                    _mm256_storeu_si256((__m256i*)out, _mm256_setzero_si256());
                    continue;
                }
                const __m128i v = _mm_loadu_si128((const __m128i*)(head + r * row_bytes + 8 + 16 * b));
                const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
                if (wsum) total = _mm256_add_epi64(total, _mm256_sad_epu8(q, _mm256_setzero_si256()));
                _mm256_storeu_si256((__m256i*)out, _mm256_sub_epi8(q, _mm256_set1_epi8((char)zeros[r])));
            }
            if (wsum) {
                const __m128i t = _mm_add_epi64(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
                wsum[g * kPanel + r] = r < rows ? (int32_t)(_mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1)) -
                                                      zeros[r] * (int32_t)group_size
                                                : 0;
            }
        }
    }
}
#endif

#include "cpu_gemm_micro.cpp"

#if AWQ_X86
// y[m][r] = acc[r][m] + bias[r] for the block's 32 weight rows and its first `mrows`
// activation rows: columns of acc read by gathers (the same sums as the scalar loop).
AWQ_AVX512_VNNI static void store_transposed_avx512(const float* acc, const float* bias, int64_t mrows, float* y,
                                                    int64_t ldy) {
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(kPanel));
    const __m512 b0 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
    for (int64_t m = 0; m < mrows; ++m) {
        _mm512_storeu_ps(y + m * ldy, _mm512_add_ps(_mm512_i32gather_ps(column, acc + m, 4), b0));
        _mm512_storeu_ps(y + m * ldy + 16, _mm512_add_ps(_mm512_i32gather_ps(column, acc + 16 * kPanel + m, 4), b1));
    }
}
#endif

// ---- the driver ----

struct Gemm {
    const int8_t* xv;          // [Kp / 4][Mp][4]
    const float* d;            // [G][Mp]
    const uint8_t* w;          // cpu_blocks, N rows
    const float* bias;         // [N] or null
    float* y;                  // [M, N]
    int64_t M, Mp, N, K, Kp, G, group_size, kc;
    int kernel;
};

// Output rows [p0, p1) of panels of 32 (the last padded with zero codes).
static void gemm_panels(const Gemm& p, int64_t p0, int64_t p1) {
    const int64_t row_bytes = p.G * (8 + 16 * (p.group_size / 32));
    std::vector<int8_t> codes(kPanel * p.Kp);
    std::vector<float> scale(p.G * kPanel), acc(kPanel * kPanel);
    std::vector<int32_t> wsum(p.G * kPanel);
    alignas(64) int32_t C[kPanel * kPanel];
    alignas(64) int32_t CC[2][kPanel * kPanel];  // AMX: two groups' products in flight
#if AWQ_X86
    if (p.kernel == GEMM_AMX) amx_configure(p.kc);
#endif
    for (int64_t panel = p0; panel < p1; ++panel) {
        const int64_t n0 = panel * kPanel, rows = std::min<int64_t>(kPanel, p.N - n0);
#if AWQ_X86
        if (p.kernel != GEMM_SCALAR)  // AMX reads signed codes directly: no sums
            unpack_panel_avx2(p.w + n0 * row_bytes, row_bytes, rows, p.G, p.group_size, p.kc, codes.data(), scale.data(),
                              p.kernel == GEMM_AMX ? nullptr : wsum.data());
        else
#endif
        for (int64_t r = 0; r < kPanel; ++r) {
            int8_t* out = code_at(codes.data(), r, 0, p.kc);
            if (r >= rows) {
                for (int64_t k = 0; k < p.Kp; k += p.kc) std::memset(code_at(codes.data(), r, k, p.kc), 0, p.kc);
                for (int64_t g = 0; g < p.G; ++g) scale[g * kPanel + r] = 0.0f, wsum[g * kPanel + r] = 0;
                continue;
            }
            unpack_row_scalar(p.w + (n0 + r) * row_bytes, p.G, p.group_size, p.kc, out, &scale[r], &wsum[r], kPanel);
        }
        for (int64_t m0 = 0; m0 < p.Mp; m0 += kPanel) {
            std::fill(acc.begin(), acc.end(), 0.0f);
#if AWQ_X86
            if (p.kernel == GEMM_AMX) {
                // Group g's products run on the tile unit while the vector units rescale group
                // g - 1's, stored one step earlier into the other buffer (read back long after
                // the tile store, not right behind it). The rescale order is unchanged.
                auto rescale = [&](int64_t g) {
                    rescale_avx512(CC[g & 1], scale.data() + g * kPanel, p.d + g * p.Mp + m0, acc.data());
                };
                for (int64_t g = 0; g < p.G; ++g) {
                    amx_issue(codes.data(), p.kc, p.xv, p.Kp, m0, g * p.group_size, p.group_size);
                    if (g) rescale(g - 1);
                    amx_store(CC[g & 1]);
                }
                rescale(p.G - 1);
            } else
#endif
            for (int64_t g = 0; g < p.G; ++g) {
                const int64_t k0 = g * p.group_size;
                const int32_t* ws = wsum.data() + g * kPanel;
                const float *s = scale.data() + g * kPanel, *d = p.d + g * p.Mp + m0;
                switch (p.kernel) {
#if AWQ_X86
                    case GEMM_AVX512_VNNI:
                        dots_vnni512(codes.data(), p.kc, p.xv, p.Kp, m0, k0, p.group_size, ws, C);
                        rescale_avx512(C, s, d, acc.data());
                        break;
                    case GEMM_AVX2:
                        dots_avx2(codes.data(), p.kc, p.xv, p.Kp, m0, k0, p.group_size, ws, C);
                        rescale_avx2(C, s, d, acc.data());
                        break;
#endif
#if AWQ_ARM
                    case GEMM_NEON_DOTPROD:
                        dots_neon_dotprod(codes.data(), p.kc, p.xv, p.Kp, m0, k0, p.group_size, ws, C);
                        rescale_neon(C, s, d, acc.data());
                        break;
#endif
                    default:
                        dots_scalar(codes.data(), p.kc, p.xv, p.Kp, m0, k0, p.group_size, ws, C);
                        rescale_scalar(C, s, d, acc.data());
                }
            }
            const int64_t mrows = std::min<int64_t>(kPanel, p.M - m0);
#if AWQ_X86
            if ((p.kernel == GEMM_AMX || p.kernel == GEMM_AVX512_VNNI) && rows == kPanel)
                store_transposed_avx512(acc.data(), p.bias ? p.bias + n0 : nullptr, mrows, p.y + m0 * p.N + n0, p.N);
            else
#endif
            for (int64_t m = 0; m < mrows; ++m) {
                float* out = p.y + (m0 + m) * p.N + n0;
                for (int64_t r = 0; r < rows; ++r) out[r] = acc[r * kPanel + m] + (p.bias ? p.bias[n0 + r] : 0.0f);
            }
        }
    }
#if AWQ_X86
    if (p.kernel == GEMM_AMX) amx_release();
#endif
}

// y [M, N] fp32 = W4A8(x [M, K] fp32, already multiplied by act_scale) + bias (fp32, may be null).
// Returns 0, or -1 for a group size this GEMM does not take (not a multiple of 32). Rows
// holding NaN or inf come out of exact_row (cpu_kernel.cpp), as the decode kernel's do.
static int w4a8_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, int64_t G, int64_t group_size,
                     const float* bias, float* y, int kernel) {
    if (group_size % 32 || G * group_size < K) return -1;
    const int64_t Kp = G * group_size, Mp = (M + kPanel - 1) / kPanel * kPanel;
    std::vector<int8_t> xv_buffer(Kp * Mp);  // zeros: the padding rows stay so
    std::vector<float> d_buffer(G * Mp, 0.0f);
    std::vector<uint8_t> bad(M, 0);
    int8_t* const xv = xv_buffer.data();
    float* const d = d_buffer.data();
    // quantize row by row, then scatter each row's four-column lanes into the VNNI order
#pragma omp parallel if (M * K >= (1 << 16))
    {
        std::vector<int8_t> q(Kp);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) {
            const float* xr = x + m * K;
            bool row_bad = false;
            for (int64_t g = 0; g < G; ++g) {
                const int64_t c = g * group_size, n = std::min(group_size, K - c);
#if AWQ_X86
                if (n == group_size && kernel != GEMM_SCALAR)
                    row_bad |= quantize_group_avx2(xr + c, group_size, q.data() + c, &d[g * Mp + m]);
                else
#endif
                    row_bad |= quantize_group_scalar(xr + c, n, group_size, q.data() + c, &d[g * Mp + m]);
            }
            bad[m] = row_bad;
            const int32_t* lanes = (const int32_t*)q.data();
            int32_t* out = (int32_t*)xv + (m / 16) * (Kp / 4) * 16 + m % 16;
            for (int64_t k4 = 0; k4 < Kp / 4; ++k4) out[k4 * 16] = lanes[k4];
        }
    }
    Gemm p{xv, d, w, bias, y, M, Mp, N, K, Kp, G, group_size, group_size % 64 ? 32 : 64, kernel};
    const int64_t panels = (N + kPanel - 1) / kPanel;
#pragma omp parallel if (panels > 1)
    {
#if defined(_OPENMP)
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
#else
        const int64_t threads = 1, t = 0;
#endif
        const int64_t per = (panels + threads - 1) / threads;  // contiguous panels per thread
        if (t * per < panels) gemm_panels(p, t * per, std::min(panels, (t + 1) * per));
    }
    for (int64_t m = 0; m < M; ++m) {
        if (!bad[m]) continue;
        exact_row(x + m * K, K, w, N, G, group_size, y + m * N);
        if (bias)
            for (int64_t n = 0; n < N; ++n) y[m * N + n] += bias[n];
    }
    return 0;
}
