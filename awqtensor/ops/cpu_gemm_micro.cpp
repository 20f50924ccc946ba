// The W4A8 GEMM's micro-kernels (included by cpu_gemm.cpp, after the buffers' layouts):
// one group's int32 products C[n][m] for a 32 x 32 block, per instruction set, and the
// fp32 rescale that adds them into the accumulators. Every variant computes the same
// exact integers and the same fma sequence, so all give the same bits.

// ---- micro-kernels: C[n][m] (32 x 32 int32) = sum over k in [k0, k0 + len) of codes[n][k] xq[m][k] ----
// codes: [32][Kp] s8; xv: [Kp / 4][Mp][4] s8 (the block's rows start at m0); wsum: [32], the
// group's sum of codes per row. The VNNI and AVX2 dot products take one unsigned operand:
// they read x + 128 (x ^ 0x80) and subtract 128 * wsum, exactly.

static void dots_scalar(const int8_t* codes, int64_t kc, const int8_t* xv, int64_t Kp, int64_t m0, int64_t k0,
                        int64_t len, const int32_t*, int32_t* C) {
    std::memset(C, 0, sizeof(int32_t) * kPanel * kPanel);
    for (int64_t k4 = k0 / 4; k4 < (k0 + len) / 4; ++k4)
        for (int n = 0; n < kPanel; ++n) {
            const int8_t* q = code_at(codes, n, 4 * k4, kc);
            for (int m = 0; m < kPanel; ++m) {
                const int8_t* x = xv_at(xv, m0 + m / 16 * 16, k4, Kp) + 4 * (m % 16);
                C[n * kPanel + m] += q[0] * x[0] + q[1] * x[1] + q[2] * x[2] + q[3] * x[3];
            }
        }
}

#if AWQ_X86
// 8 activation rows per register: maddubs (u8 x s8 -> s16 pairs, at most 2 * 255 * 15: no
// saturation) then madd by ones.
AWQ_AVX2 static void dots_avx2(const int8_t* codes, int64_t kc, const int8_t* xv, int64_t Kp, int64_t m0, int64_t k0,
                               int64_t len, const int32_t* wsum, int32_t* C) {
    const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    for (int n0 = 0; n0 < kPanel; n0 += 2) {
        __m256i acc[2][4];
        for (int r = 0; r < 2; ++r)
            for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
        for (int64_t k4 = k0 / 4; k4 < (k0 + len) / 4; ++k4) {
            __m256i x[4];
            for (int j = 0; j < 4; ++j)
                x[j] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(xv_at(xv, m0 + 16 * (j / 2), k4, Kp) + 32 * (j % 2))), flip);
            for (int r = 0; r < 2; ++r) {
                int32_t q4;
                std::memcpy(&q4, code_at(codes, n0 + r, 4 * k4, kc), 4);
                const __m256i q = _mm256_set1_epi32(q4);
                for (int j = 0; j < 4; ++j)
                    acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(x[j], q), ones));
            }
        }
        for (int r = 0; r < 2; ++r) {
            const __m256i corr = _mm256_set1_epi32(128 * wsum[n0 + r]);
            for (int j = 0; j < 4; ++j)
                _mm256_storeu_si256((__m256i*)(C + (n0 + r) * kPanel + 8 * j), _mm256_sub_epi32(acc[r][j], corr));
        }
    }
}

// 16 activation rows per register, vpdpbusd; 4 weight rows at a time.
AWQ_AVX512_VNNI static void dots_vnni512(const int8_t* codes, int64_t kc, const int8_t* xv, int64_t Kp, int64_t m0,
                                         int64_t k0, int64_t len, const int32_t* wsum, int32_t* C) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int n0 = 0; n0 < kPanel; n0 += 4) {
        __m512i acc[4][2];
        for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
        for (int64_t k4 = k0 / 4; k4 < (k0 + len) / 4; ++k4) {
            const __m512i x0 = _mm512_xor_si512(_mm512_loadu_si512(xv_at(xv, m0, k4, Kp)), flip);
            const __m512i x1 = _mm512_xor_si512(_mm512_loadu_si512(xv_at(xv, m0 + 16, k4, Kp)), flip);
            for (int r = 0; r < 4; ++r) {
                int32_t q4;
                std::memcpy(&q4, code_at(codes, n0 + r, 4 * k4, kc), 4);
                const __m512i q = _mm512_set1_epi32(q4);
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], x0, q);
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], x1, q);
            }
        }
        for (int r = 0; r < 4; ++r) {
            const __m512i corr = _mm512_set1_epi32(128 * wsum[n0 + r]);
            _mm512_storeu_si512(C + (n0 + r) * kPanel, _mm512_sub_epi32(acc[r][0], corr));
            _mm512_storeu_si512(C + (n0 + r) * kPanel + 16, _mm512_sub_epi32(acc[r][1], corr));
        }
    }
}

// Tiles: 0-3 C (16 x 16 int32), 4-5 A (16 weight rows x kc code bytes), 6-7 B (kc / 4 rows
// of 16 activation rows x 4 bytes).
struct TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

AWQ_AMX static void amx_configure(int64_t kc) {
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    for (int t = 4; t < 6; ++t) cfg.rows[t] = 16, cfg.colsb[t] = (uint16_t)kc;
    for (int t = 6; t < 8; ++t) cfg.rows[t] = (uint8_t)(kc / 4), cfg.colsb[t] = 64;
    // GCC 12 drops the stores above as dead (it does not see ldtilecfg read them): a barrier
    asm volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

AWQ_AMX static void amx_release() { _tile_release(); }

// One group's products into the four C tiles (2 x 2: weight rows 0-15 / 16-31 x activation
// rows m0 .. m0 + 15 / + 31); amx_store writes them out as C [32][32].
AWQ_AMX static void amx_issue(const int8_t* codes, int64_t kc, const int8_t* xv, int64_t Kp, int64_t m0, int64_t k0,
                              int64_t len) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = k0; k < k0 + len; k += kc) {
        _tile_loadd(4, code_at(codes, 0, k, kc), kc);
        _tile_loadd(5, code_at(codes, 16, k, kc), kc);
        _tile_loadd(6, xv_at(xv, m0, k / 4, Kp), 64);
        _tile_loadd(7, xv_at(xv, m0 + 16, k / 4, Kp), 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
    }
}

AWQ_AMX static void amx_store(int32_t* C) {
    const int64_t cstride = kPanel * 4;
    _tile_stored(0, C, cstride);
    _tile_stored(1, C + 16, cstride);
    _tile_stored(2, C + 16 * kPanel, cstride);
    _tile_stored(3, C + 16 * kPanel + 16, cstride);
}
#endif

#if AWQ_ARM
// 4 activation rows per register, sdot (signed codes x signed activations: no correction);
// 2 weight rows at a time, 16 accumulators.
#define AWQ_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
AWQ_DOTPROD static void dots_neon_dotprod(const int8_t* codes, int64_t kc, const int8_t* xv, int64_t Kp, int64_t m0,
                                          int64_t k0, int64_t len, const int32_t*, int32_t* C) {
    for (int n0 = 0; n0 < kPanel; n0 += 2) {
        int32x4_t acc[2][8];
        for (int r = 0; r < 2; ++r)
            for (int j = 0; j < 8; ++j) acc[r][j] = vdupq_n_s32(0);
        for (int64_t k4 = k0 / 4; k4 < (k0 + len) / 4; ++k4) {
            int8x16_t x[8];  // x[j]: activation rows 4j .. 4j + 3 of the block, four columns each
            for (int j = 0; j < 8; ++j) x[j] = vld1q_s8(xv_at(xv, m0 + 16 * (j / 4), k4, Kp) + 16 * (j % 4));
            for (int r = 0; r < 2; ++r) {
                int32_t q4;
                std::memcpy(&q4, code_at(codes, n0 + r, 4 * k4, kc), 4);
                const int8x16_t q = vreinterpretq_s8_s32(vdupq_n_s32(q4));
                for (int j = 0; j < 8; ++j) acc[r][j] = vdotq_s32(acc[r][j], x[j], q);
            }
        }
        for (int r = 0; r < 2; ++r)
            for (int j = 0; j < 8; ++j) vst1q_s32(C + (n0 + r) * kPanel + 4 * j, acc[r][j]);
    }
}

// rescale_scalar's arithmetic (vfmaq_f32 is the fused multiply-add std::fma computes)
static void rescale_neon(const int32_t* C, const float* s, const float* d, float* acc) {
    for (int n = 0; n < kPanel; ++n) {
        const float32x4_t sn = vdupq_n_f32(s[n]);
        for (int j = 0; j < 8; ++j) {
            float* a = acc + n * kPanel + 4 * j;
            const float32x4_t c = vcvtq_f32_s32(vld1q_s32(C + n * kPanel + 4 * j));
            vst1q_f32(a, vfmaq_f32(vld1q_f32(a), c, vmulq_f32(sn, vld1q_f32(d + 4 * j))));
        }
    }
}
#endif

// acc[n][m] += C[n][m] * (s[n] * d[m])   (one product, one fma: the same in every variant)
static void rescale_scalar(const int32_t* C, const float* s, const float* d, float* acc) {
    for (int n = 0; n < kPanel; ++n)
        for (int m = 0; m < kPanel; ++m) {
            float& a = acc[n * kPanel + m];
            a = std::fma((float)C[n * kPanel + m], s[n] * d[m], a);
        }
}

#if AWQ_X86
AWQ_AVX2 static void rescale_avx2(const int32_t* C, const float* s, const float* d, float* acc) {
    __m256 dv[4];
    for (int j = 0; j < 4; ++j) dv[j] = _mm256_loadu_ps(d + 8 * j);
    for (int n = 0; n < kPanel; ++n) {
        const __m256 sn = _mm256_set1_ps(s[n]);
        for (int j = 0; j < 4; ++j) {
            float* a = acc + n * kPanel + 8 * j;
            const __m256 c = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)(C + n * kPanel + 8 * j)));
            _mm256_storeu_ps(a, _mm256_fmadd_ps(c, _mm256_mul_ps(sn, dv[j]), _mm256_loadu_ps(a)));
        }
    }
}

AWQ_AVX512_VNNI static void rescale_avx512(const int32_t* C, const float* s, const float* d, float* acc) {
    const __m512 d0 = _mm512_loadu_ps(d), d1 = _mm512_loadu_ps(d + 16);
    for (int n = 0; n < kPanel; ++n) {
        const __m512 sn = _mm512_set1_ps(s[n]);
        float* a = acc + n * kPanel;
        const __m512 c0 = _mm512_cvtepi32_ps(_mm512_loadu_si512(C + n * kPanel));
        const __m512 c1 = _mm512_cvtepi32_ps(_mm512_loadu_si512(C + n * kPanel + 16));
        _mm512_storeu_ps(a, _mm512_fmadd_ps(c0, _mm512_mul_ps(sn, d0), _mm512_loadu_ps(a)));
        _mm512_storeu_ps(a + 16, _mm512_fmadd_ps(c1, _mm512_mul_ps(sn, d1), _mm512_loadu_ps(a + 16)));
    }
}
#endif

