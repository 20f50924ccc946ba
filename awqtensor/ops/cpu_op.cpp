// awqtensor::int4_linear's CPU kernel in C++, so a call costs no Python: cpu_kernel.py
// builds this file (which includes cpu_kernel.cpp) against torch's headers on first use
// and loads it with torch.ops.load_library. The "cpu_blocks" layout runs the kernel here,
// or for large calls dequantizes and runs torch's matmul (dense_linear); other layouts go
// back to the Python dispatcher, awqtensor::_int4_linear_py.
// Without this file built, the kernel (not dense_linear) runs through ctypes from
// awqtensor/ops/cpu.py.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/linear.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

#include "cpu_kernel.cpp"
#include "cpu_gemm.cpp"

namespace {

// AWQTENSOR_CPU_ISA, read per call (cheap) so that tests and users may change it.
int isa_from_env() {
    const char* name = std::getenv("AWQTENSOR_CPU_ISA");
    if (!name || !*name) {
        static const int best = awq_cpu_best_isa();
        return best;
    }
    static const struct { const char* name; int isa; } names[] = {
        {"scalar", SCALAR}, {"avx2", AVX2}, {"avx2_vnni", AVX2_VNNI}, {"avx512_vnni", AVX512_VNNI},
        {"neon", NEON}, {"neon_dotprod", NEON_DOTPROD}};
    for (const auto& n : names)
        if (std::string_view(name) == n.name && awq_cpu_isa_supported(n.isa)) return n.isa;
    TORCH_CHECK(false, "AWQTENSOR_CPU_ISA=", name, ": not a path this CPU/build supports");
}

int dtype_code(c10::ScalarType t) {
    switch (t) {
        case c10::ScalarType::Float: return F32;
        case c10::ScalarType::BFloat16: return BF16;
        case c10::ScalarType::Half: return F16;
        default: TORCH_CHECK(false, "awqtensor::int4_linear: activations must be float32, bfloat16 or float16, got ", t);
    }
}

// The large-M route: from this many rows and multiply-adds (set from Python by
// cpu_kernel.dense_route; 0 rows = never), dequantize W to dense_dtype (BF16 on CPUs with
// native bf16 matmuls, else F32) and run torch's matmul. Weights larger than dense_chunk
// elements are dequantized and multiplied in pieces.
int64_t dense_min_m = 0, dense_min_macs = 0, dense_chunk = int64_t(1) << 24;
int dense_dtype = BF16;

bool disabled(std::string_view name) {  // AWQTENSOR_DISABLE=a,b,...
    const char* env = std::getenv("AWQTENSOR_DISABLE");
    for (std::string_view rest = env ? env : ""; !rest.empty();) {
        const size_t comma = rest.find(',');
        if (rest.substr(0, comma) == name) return true;
        rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    }
    return false;
}

// ---- argument checks: every size the kernels trust, before a pointer reaches them ----
// The contract of reference.check_linear_args (the Python paths), for "cpu_blocks"
// weights. Integer comparisons only (a decode call takes ~5 us); the messages are built
// only on failure. ValueError, naming the argument, what was expected and what came.

bool is_float(c10::ScalarType t) {
    return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// The weight's tensors and group_size against in_features (x's last dimension, or
// dequantize's in_features): scales [N, G] float, qweight uint8 [N, G * (8 + 16 nb)]
// (packing.to_cpu_blocks, nb = ceil(group_size / 32)), zeros uint8 [N, G] when given,
// act_scale [in_features] float when given. Returns N.
int64_t check_weight(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& act_scale,
                     int64_t group_size, int64_t in_features, const char* in_name) {
    TORCH_CHECK_VALUE(group_size > 0 && group_size <= (int64_t(1) << 32), op,
                      ": group_size must be a positive number of columns, got ", group_size);
    TORCH_CHECK_VALUE(scales.dim() == 2 && is_float(scales.scalar_type()), op,
                      ": scales must be a 2-D [N, G] float tensor, got ", scales.scalar_type(), " of shape ",
                      scales.sizes());
    const int64_t n = scales.size(0), groups = scales.size(1);
    TORCH_CHECK_VALUE(in_features >= 1 && groups == (in_features - 1) / group_size + 1, op, ": ", in_name, " = ",
                      in_features, " does not fit the weight's ", groups, " groups of ", group_size,
                      " columns (scales.shape[1]): expected ", (groups - 1) * group_size + 1, " to ",
                      groups * group_size, " columns, i.e. ceil(", in_name, " / group_size) = G");
    const int64_t row_bytes = groups * (8 + 16 * ((group_size + 31) / 32));
    TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.size(0) == n &&
                          qweight.size(1) == row_bytes && qweight.is_cpu(),
                      op, ": qweight must be a CPU uint8 tensor of [N, G * (8 + 16 * ceil(group_size / 32))] = [", n,
                      ", ", row_bytes, "] bytes (the 'cpu_blocks' layout), got ", qweight.scalar_type(), " of shape ",
                      qweight.sizes(), " on ", qweight.device());
    if (zeros && zeros->defined())
        TORCH_CHECK_VALUE(zeros->scalar_type() == at::kByte && zeros->dim() == 2 && zeros->size(0) == n &&
                              zeros->size(1) == groups,
                          op, ": zeros must be uint8 [N, G] = [", n, ", ", groups, "] like scales, got ",
                          zeros->scalar_type(), " of shape ", zeros->sizes());
    if (act_scale && act_scale->defined())
        TORCH_CHECK_VALUE(act_scale->dim() == 1 && act_scale->size(0) == in_features &&
                              is_float(act_scale->scalar_type()) && act_scale->is_cpu(),
                          op, ": act_scale must be a 1-D float CPU tensor of ", in_name, " = ", in_features,
                          " elements, got ", act_scale->scalar_type(), " of shape ", act_scale->sizes(), " on ",
                          act_scale->device());
    return n;
}

// A linear call: x [..., K] float (float32, bfloat16, float16), the weight (check_weight),
// bias [N] float when given.
void check_linear(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                  const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& act_scale,
                  const std::optional<at::Tensor>& bias, int64_t group_size) {
    TORCH_CHECK_VALUE(x.dim() >= 1 && is_float(x.scalar_type()) && x.is_cpu(), op,
                      ": x must be a float32, bfloat16 or float16 CPU tensor of [..., in_features], got ",
                      x.scalar_type(), " of shape ", x.sizes(), " on ", x.device());
    const int64_t n = check_weight(op, qweight, scales, zeros, act_scale, group_size, x.size(-1), "x.shape[-1]");
    if (bias && bias->defined())
        TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n && is_float(bias->scalar_type()) && bias->is_cpu(),
                          op, ": bias must be a 1-D float CPU tensor of N = ", n, " elements (scales.shape[0]), got ",
                          bias->scalar_type(), " of shape ", bias->sizes(), " on ", bias->device());
}

// Whether an [m, k] x [n, k] call takes dense_linear rather than the int8 kernel.
bool takes_dense_route(int64_t m, int64_t n, int64_t k) {
    return dense_min_m && m >= dense_min_m && m * n * k >= dense_min_macs && !disabled("cpu_dense") &&
           !disabled("cpu_dense_bf16");
}

// x2 (* act) in the route's dtype: bf16 in one pass of our own (torch's fp16 -> bf16 is
// slow), rounded once per product; fp32 exactly as given, products in fp32.
at::Tensor route_input(const at::Tensor& x2, int dtype, const at::Tensor& act, int isa) {
    const int64_t m = x2.size(0), k = x2.size(1);
    if (dense_dtype == F32) {
        at::Tensor xf = x2.to(at::kFloat);
        return act.defined() ? xf.mul(act.to(at::kFloat)) : xf;
    }
    if (x2.scalar_type() == at::kBFloat16 && !act.defined()) return x2;
    at::Tensor xb = at::empty({m, k}, x2.options().dtype(at::kBFloat16));
    const int rc = awq_cpu_to_bf16(x2.data_ptr(), m, k, dtype, act.defined() ? act.data_ptr() : nullptr,
                                   (uint16_t*)xb.data_ptr(), isa);
    TORCH_CHECK(rc == 0, "awqtensor CPU kernel: activation conversion refused (code ", rc, ")");
    return xb;
}

// y = x2 (* act) @ W.T (+ b) through a dense copy of W in dense_dtype, chunk by chunk; with
// bf16, rounding of x, W and the result, fp32 accumulation inside torch's matmul. Each
// thread keeps its chunk buffer: a fresh 32 MiB one per call would cost more in page
// faults than the work.
at::Tensor dense_linear(const at::Tensor& x2, int dtype, const at::Tensor& w, int64_t n, int64_t groups,
                        int64_t group_size, const at::Tensor& act, const at::Tensor& b) {
    const int64_t k = x2.size(1), row_bytes = w.size(1);
    const int isa = isa_from_env();
    const at::Tensor xr = route_input(x2, dtype, act, isa);
    const int64_t chunk = std::max<int64_t>(1, std::min(n, dense_chunk / std::max<int64_t>(k, 1)));
    thread_local at::Tensor scratch;
    if (!scratch.defined() || scratch.numel() < chunk * k || scratch.scalar_type() != xr.scalar_type())
        scratch = at::empty({chunk * k}, xr.options());
    auto dequantized = [&](int64_t n0, int64_t rows) {
        at::Tensor wd = scratch.narrow(0, 0, rows * k).view({rows, k});
        const int rc = awq_cpu_dequantize((const uint8_t*)w.data_ptr() + n0 * row_bytes, rows, k, groups, group_size,
                                          dense_dtype, wd.data_ptr(), isa);
        TORCH_CHECK(rc == 0, "awqtensor CPU kernel: dequantization refused (code ", rc, ")");
        return wd;
    };
    at::Tensor y;
    if (chunk >= n) {
        y = at::linear(xr, dequantized(0, n));
        // through fp32: torch's bf16 -> fp16 conversion is 3x slower than both steps
        if (y.scalar_type() != x2.scalar_type()) y = y.to(at::kFloat).to(x2.scalar_type());
    } else {
        y = at::empty({x2.size(0), n}, x2.options());
        for (int64_t n0 = 0; n0 < n; n0 += chunk) {
            const int64_t rows = std::min(chunk, n - n0);
            y.narrow(1, n0, rows).copy_(at::linear(xr, dequantized(n0, rows)));
        }
    }
    if (b.defined()) y.add_(b);
    return y;
}

// The Python dispatcher's op for layouts the C++ kernels do not read (same schema as
// int4_linear and w4a8_linear).
using LinearSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, int64_t, c10::string_view);
c10::TypedOperatorHandle<LinearSignature> python_linear(const char* name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<LinearSignature>();
}

bool is_cpu_blocks(c10::string_view packing_format) {
    return std::string_view(packing_format.data(), packing_format.size()) == "cpu_blocks";
}

// int4_linear on a "cpu_blocks" weight whose arguments check_linear passed.
at::Tensor int4_linear_checked(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& act_scale, const std::optional<at::Tensor>& bias,
                               int64_t group_size) {
    const int64_t k = x.size(-1), n = scales.size(0), groups = scales.size(1);
    const int dtype = dtype_code(x.scalar_type());
    const bool flat = x.dim() == 2 && x.is_contiguous();  // decode's case: no reshape, no view
    const at::Tensor x2 = flat ? x : x.reshape({-1, k}).contiguous();
    const at::Tensor w = qweight.is_contiguous() ? qweight : qweight.contiguous();
    at::Tensor act, b;
    if (act_scale) act = act_scale->to(x.scalar_type()).contiguous();
    if (bias) b = bias->to(x.scalar_type()).contiguous();
    const int64_t m = x2.size(0);
    at::Tensor y;
    if (takes_dense_route(m, n, k)) {
        y = dense_linear(x2, dtype, w, n, groups, group_size, act, b);
    } else {
        y = at::empty({m, n}, x.options());
        const int rc = m ? awq_cpu_linear(x2.data_ptr(), m, k, dtype, (const uint8_t*)w.data_ptr(), n, groups,
                                          group_size, act.defined() ? act.data_ptr() : nullptr,
                                          b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), isa_from_env())
                         : 0;
        TORCH_CHECK(rc != -2, "awqtensor CPU kernel: out of memory for its activation buffer");
        TORCH_CHECK(rc == 0, "awqtensor CPU kernel refused the call (code ", rc, ")");
    }
    if (flat) return y;
    auto shape = x.sizes().vec();
    shape.back() = n;
    return y.view(shape);
}

// Layouts other than "cpu_blocks", and AWQTENSOR_DISABLE=cpu_blocks, go to the Python
// dispatcher (which checks the arguments against their layout and, the kernel disabled,
// runs the reference).
at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& act_scale,
                           const std::optional<at::Tensor>& bias, int64_t group_size, c10::string_view packing_format) {
    if (!is_cpu_blocks(packing_format) || disabled("cpu_blocks")) {
        static auto python = python_linear("awqtensor::_int4_linear_py");
        return python.call(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format);
    }
    check_linear("awqtensor::int4_linear", x, qweight, scales, zeros, act_scale, bias, group_size);
    return int4_linear_checked(x, qweight, scales, act_scale, bias, group_size);
}

// ---- awqtensor::w4a8_linear: the prefill/decode switch ----
// Calls of w4a8_min_m rows up to (not including) w4a8_max_m (M = numel / K; set from Python
// by ops/w4a8.py; min 0 = never, max 0 = no limit) run the W4A8 GEMM (cpu_gemm.cpp) with
// w4a8_kernel; the others run weight-only (int4_linear_cpu: the int8-per-32-column decode
// kernel or the dense route), as do group sizes that are not a multiple of 32 and
// AWQTENSOR_DISABLE=cpu_w4a8 (or w4a8, which turns W4A8 off on every device).
int64_t w4a8_min_m = 0, w4a8_max_m = 0;
int w4a8_kernel = -1;  // -1: the best this CPU has

bool takes_w4a8_gemm(int64_t m, int64_t group_size) {
    return w4a8_min_m && m >= w4a8_min_m && (!w4a8_max_m || m < w4a8_max_m) && group_size % 32 == 0 &&
           !disabled("cpu_w4a8") && !disabled("w4a8");
}

at::Tensor w4a8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& act_scale,
                           const std::optional<at::Tensor>& bias, int64_t group_size, c10::string_view packing_format) {
    if (!is_cpu_blocks(packing_format) || disabled("cpu_blocks")) {
        static auto python = python_linear("awqtensor::_w4a8_linear_py");
        return python.call(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format);
    }
    check_linear("awqtensor::w4a8_linear", x, qweight, scales, zeros, act_scale, bias, group_size);
    const int64_t k = x.size(-1), n = scales.size(0), groups = scales.size(1);
    const int64_t m = x.numel() / k;
    if (!m || !takes_w4a8_gemm(m, group_size))
        return int4_linear_checked(x, qweight, scales, act_scale, bias, group_size);
    at::Tensor x2 = x.reshape({m, k}).to(at::kFloat);
    if (act_scale) x2 = x2.mul(act_scale->to(at::kFloat));
    x2 = x2.contiguous();
    const at::Tensor w = qweight.contiguous();
    at::Tensor b;
    if (bias) b = bias->to(at::kFloat).contiguous();
    at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
    const int kernel = w4a8_kernel >= 0 ? w4a8_kernel : gemm_best_kernel();
    const int rc = w4a8_gemm(x2.data_ptr<float>(), m, k, (const uint8_t*)w.data_ptr(), n, groups, group_size,
                             b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), kernel);
    TORCH_CHECK(rc == 0, "awqtensor W4A8 GEMM refused the call (code ", rc, ")");
    if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
    auto shape = x.sizes().vec();
    shape.back() = n;
    return y.view(shape);
}

// awqtensor::dequantize on the CPU: "cpu_blocks" in fp32/bf16 through the kernel's
// dequantization (no Python per call); anything else back to _dequantize_py.
at::Tensor dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                          const std::optional<at::Tensor>& act_scale, int64_t group_size, int64_t in_features,
                          c10::string_view packing_format) {
    const auto dtype = scales.scalar_type();
    if (!is_cpu_blocks(packing_format) || (dtype != at::kFloat && dtype != at::kBFloat16) || disabled("cpu_blocks")) {
        static auto python = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("awqtensor::_dequantize_py", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                   const std::optional<at::Tensor>&, int64_t, int64_t, c10::string_view)>();
        return python.call(qweight, scales, zeros, act_scale, group_size, in_features, packing_format);
    }
    const int64_t n = check_weight("awqtensor::dequantize", qweight, scales, zeros, act_scale, group_size, in_features,
                                   "in_features");
    const at::Tensor w = qweight.contiguous();
    at::Tensor out = at::empty({n, in_features}, scales.options());
    const int rc = awq_cpu_dequantize((const uint8_t*)w.data_ptr(), n, in_features, scales.size(1), group_size,
                                      dtype == at::kFloat ? F32 : BF16, out.data_ptr(), isa_from_env());
    TORCH_CHECK(rc == 0, "awqtensor CPU kernel: dequantization refused (code ", rc, ")");
    return act_scale ? out.mul(*act_scale).to(dtype) : out;
}

// ---- awqtensor::decode_attention: one new token per row over a KV cache ----
// out[b, 0, h] = softmax_j(<q[b, h], k[b, h / group, j]> * scale (+ mask)) @ v[b, h / group]
// over the keys the mask lets through (a bool mask's False and an additive mask's -inf are
// skipped, so a static cache costs only its filled part). fp32 throughout, each dot
// product and sum in a fixed order; other dtypes go through fp32.

// scores[i] = <q, k[keys[i]]> * scale + add[i] (add may be null).
void scores_scalar(const float* q, const float* k, int64_t D, const int64_t* keys, const float* add, int64_t n,
                   float scale, float* scores) {
    for (int64_t i = 0; i < n; ++i) {
        const float* kr = k + keys[i] * D;
        float s = 0.0f;
        for (int64_t c = 0; c < D; ++c) s += q[c] * kr[c];
        scores[i] = s * scale + (add ? add[i] : 0.0f);
    }
}

// out = sum_i p[i] v[keys[i]]
void mix_scalar(const float* p, const float* v, int64_t D, const int64_t* keys, int64_t n, float* out) {
    std::fill(out, out + D, 0.0f);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < D; ++c) out[c] += p[i] * v[keys[i] * D + c];
}

#if AWQ_X86
// The same for D % 8 == 0: a key's dot product in two fma chains, the mix 64 columns at a
// time in eight registers (SmolLM2's 9 heads x 256 keys: 29 us against 59 us for a plain
// dot/axpy per key, standalone on the AVX2 EPYC).
AWQ_AVX2 void scores_avx2(const float* q, const float* k, int64_t D, const int64_t* keys, const float* add,
                          int64_t n, float scale, float* scores) {
    for (int64_t i = 0; i < n; ++i) {
        const float* kr = k + keys[i] * D;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 16 <= D; c += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(kr + c), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 8), _mm256_loadu_ps(kr + c + 8), a1);
        }
        if (c < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(kr + c), a0);
        scores[i] = hsum8(_mm256_add_ps(a0, a1)) * scale + (add ? add[i] : 0.0f);
    }
}

AWQ_AVX2 void mix_avx2(const float* p, const float* v, int64_t D, const int64_t* keys, int64_t n, float* out) {
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
        const int width = (int)(std::min<int64_t>(64, D - c0) / 8);
        __m256 acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; ++i) {
            const float* vr = v + keys[i] * D + c0;
            const __m256 pv = _mm256_set1_ps(p[i]);
            for (int r = 0; r < width; ++r) acc[r] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vr + 8 * r), acc[r]);
        }
        for (int r = 0; r < width; ++r) _mm256_storeu_ps(out + c0 + 8 * r, acc[r]);
    }
}
#endif

// Keys from `limit` on are skipped as well (the decode step's unfilled cache slots).
at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& mask, double scale, int64_t limit) {
    TORCH_CHECK(query.dim() == 4 && query.size(2) == 1 && key.dim() == 4 && value.sizes() == key.sizes(),
                "awqtensor::decode_attention: query [B, H, 1, D] and key, value [B, KVH, L, D], got ",
                query.sizes(), ", ", key.sizes(), ", ", value.sizes());
    const int64_t B = query.size(0), H = query.size(1), D = query.size(3), KVH = key.size(1), L = key.size(2);
    TORCH_CHECK(key.size(0) == B && key.size(3) == D && KVH > 0 && H % KVH == 0,
                "awqtensor::decode_attention: key/value ", key.sizes(), " do not fit query ", query.sizes());
    TORCH_CHECK(c10::isFloatingType(query.scalar_type()) && c10::isFloatingType(key.scalar_type()) &&
                    c10::isFloatingType(value.scalar_type()) && query.is_cpu() && key.is_cpu() && value.is_cpu(),
                "awqtensor::decode_attention: query, key and value must be float CPU tensors, got ",
                query.scalar_type(), ", ", key.scalar_type(), ", ", value.scalar_type());
    if (query.scalar_type() != at::kFloat || key.scalar_type() != at::kFloat || value.scalar_type() != at::kFloat)
        return attention(query.to(at::kFloat), key.to(at::kFloat), value.to(at::kFloat), mask, scale, limit)
            .to(query.scalar_type());
    const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
    // the mask's last query row, [B or 1, H or 1, ..., >= L], bool (True = attend) or additive
    at::Tensor m;
    int64_t mb = 0, mh = 0, mj = 0;
    if (mask && mask->defined()) {
        TORCH_CHECK((mask->scalar_type() == at::kBool || c10::isFloatingType(mask->scalar_type())) && mask->is_cpu() &&
                        (mask->dim() != 4 || mask->size(2) >= 1),
                    "awqtensor::decode_attention: mask must be a bool (True = attend) or float (additive) CPU "
                    "tensor broadcastable to [B, H, 1, >= L], got ", mask->scalar_type(), " of shape ", mask->sizes());
        m = mask->dim() == 4 ? mask->select(2, mask->size(2) - 1) : *mask;
        TORCH_CHECK(m.dim() == 3 && (m.size(0) == 1 || m.size(0) == B) && (m.size(1) == 1 || m.size(1) == H) &&
                        m.size(2) >= L, "awqtensor::decode_attention: mask ", mask->sizes(), " does not fit ", key.sizes());
        if (m.scalar_type() != at::kBool && m.scalar_type() != at::kFloat) m = m.to(at::kFloat);
        mb = m.size(0) == 1 ? 0 : m.stride(0);
        mh = m.size(1) == 1 ? 0 : m.stride(1);
        mj = m.stride(2);
    }
    const bool* bool_mask = m.defined() && m.scalar_type() == at::kBool ? m.data_ptr<bool>() : nullptr;
    const float* add_mask = m.defined() && !bool_mask ? m.data_ptr<float>() : nullptr;
    at::Tensor out = at::empty({B, 1, H, D}, q.options());
    const float* qp = q.data_ptr<float>();
    const float* kp = k.data_ptr<float>();
    const float* vp = v.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int group = (int)(H / KVH);
    auto scores_fn = scores_scalar;
    auto mix_fn = mix_scalar;
#if AWQ_X86
    if (D % 8 == 0 && avx2_family(isa_from_env())) scores_fn = scores_avx2, mix_fn = mix_avx2;
#endif
    auto rows = [&](int64_t begin, int64_t end) {
        std::vector<float> scores(L), adds(add_mask ? L : 0);
        std::vector<int64_t> keys(L);
        for (int64_t r = begin; r < end; ++r) {  // r = b * H + h
            const int64_t b = r / H, h = r % H;
            int64_t n = 0;  // the keys this row attends to
            for (int64_t j = 0; j < std::min(L, limit); ++j) {
                const int64_t at = b * mb + h * mh + j * mj;
                if (bool_mask && !bool_mask[at]) continue;
                if (add_mask) {
                    if (add_mask[at] == -std::numeric_limits<float>::infinity()) continue;
                    adds[n] = add_mask[at];
                }
                keys[n++] = j;
            }
            const float* qr = qp + r * D;
            const float* kr = kp + (b * KVH + h / group) * L * D;
            const float* vr = vp + (b * KVH + h / group) * L * D;
            const float* add = add_mask ? adds.data() : nullptr;
            float* o = op + r * D;  // out[b, 0, h]
            scores_fn(qr, kr, D, keys.data(), add, n, (float)scale, scores.data());
            const float top = n ? *std::max_element(scores.begin(), scores.begin() + n) : 0.0f;
            float total = 0.0f;
            for (int64_t i = 0; i < n; ++i) total += scores[i] = std::exp(scores[i] - top);
            mix_fn(scores.data(), vr, D, keys.data(), n, o);
            const float inv = 1.0f / total;  // no key at all: 0 * inf = NaN, as softmax gives
            for (int64_t c = 0; c < D; ++c) o[c] *= inv;
        }
    };
    // one thread for SmolLM2's 9 heads over a short cache (a few us of work)
    at::parallel_for(0, B * H, std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(L * D, 1)), rows);
    return out;
}

at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const std::optional<at::Tensor>& mask, double scale) {
    return attention(query, key, value, mask, scale, key.size(2));
}

#include "cpu_step.cpp"

}  // namespace

extern "C" void awq_cpu_set_dense_route(int64_t min_m, int64_t min_macs, int64_t chunk, int64_t dtype) {
    dense_min_m = min_m;
    dense_dtype = dtype == F32 ? F32 : BF16;
    dense_min_macs = min_macs;
    dense_chunk = chunk;
}

// Calls of [min_m, max_m) rows take the W4A8 GEMM (min 0 = never, max 0 = no limit), with
// `kernel` (-1 = the best here).
extern "C" void awq_cpu_set_w4a8_route(int64_t min_m, int64_t max_m, int64_t kernel) {
    w4a8_min_m = min_m;
    w4a8_max_m = max_m;
    w4a8_kernel = (int)kernel;
}

// 1 if this CPU runs the W4A8 GEMM's micro-kernel `kernel` (GemmKernel: 0 scalar, 1 avx2, 2 avx512_vnni,
// 3 amx, 4 neon_dotprod; w4a8.CPU_KERNELS in that order).
extern "C" int awq_cpu_w4a8_kernel_supported(int64_t kernel) { return gemm_kernel_supported((int)kernel); }

TORCH_LIBRARY_IMPL(awqtensor, CPU, m) {
    m.impl("int4_linear", &int4_linear_cpu);
    m.impl("w4a8_linear", &w4a8_linear_cpu);
    m.impl("decode_attention", &decode_attention_cpu);
    m.impl("dequantize", &dequantize_cpu);
}
