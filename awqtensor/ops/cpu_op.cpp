// awqtensor::int4_linear's CPU kernel in C++, so a call costs no Python: cpu_kernel.py
// builds this file (which includes cpu_kernel.cpp) against torch's headers on first use
// and loads it with torch.ops.load_library. The "cpu_blocks" layout runs the kernel here,
// or for large calls dequantizes and runs torch's matmul (dense_linear); other layouts go
// back to the Python dispatcher, awqtensor::_int4_linear_py.
// Without this file built, the kernel (not dense_linear) runs through ctypes from
// awqtensor/ops/cpu.py.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string_view>

#include "cpu_kernel.cpp"

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

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& act_scale,
                           const std::optional<at::Tensor>& bias, int64_t group_size, c10::string_view packing_format) {
    if (std::string_view(packing_format.data(), packing_format.size()) != "cpu_blocks") {
        static auto python = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("awqtensor::_int4_linear_py", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                   const std::optional<at::Tensor>&, int64_t, c10::string_view)>();
        return python.call(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format);
    }
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
    if (dense_min_m && m >= dense_min_m && m * n * k >= dense_min_macs && !disabled("cpu_dense") && !disabled("cpu_dense_bf16")) {
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

}  // namespace

extern "C" void awq_cpu_set_dense_route(int64_t min_m, int64_t min_macs, int64_t chunk, int64_t dtype) {
    dense_min_m = min_m;
    dense_dtype = dtype == F32 ? F32 : BF16;
    dense_min_macs = min_macs;
    dense_chunk = chunk;
}

TORCH_LIBRARY_IMPL(awqtensor, CPU, m) { m.impl("int4_linear", &int4_linear_cpu); }
