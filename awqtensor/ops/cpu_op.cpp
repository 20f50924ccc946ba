// awqtensor::int4_linear's CPU kernel in C++, so a call costs no Python: cpu_kernel.py
// builds this file (which includes cpu_kernel.cpp) against torch's headers on first use
// and loads it with torch.ops.load_library. The "cpu_blocks" layout runs the kernel here;
// other layouts go back to the Python dispatcher, awqtensor::_int4_linear_py. Without this
// file built, the same kernel runs through ctypes from awqtensor/ops/cpu.py.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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
        {"scalar", SCALAR}, {"avx2", AVX2}, {"avx2_vnni", AVX2_VNNI}, {"neon", NEON}, {"neon_dotprod", NEON_DOTPROD}};
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
    const int dtype = dtype_code(x.scalar_type());
    const int64_t k = x.size(-1), n = scales.size(0), groups = scales.size(1);
    const bool flat = x.dim() == 2 && x.is_contiguous();  // decode's case: no reshape, no view
    const at::Tensor x2 = flat ? x : x.reshape({-1, k}).contiguous();
    const at::Tensor w = qweight.is_contiguous() ? qweight : qweight.contiguous();
    at::Tensor act, b;
    if (act_scale) act = act_scale->to(x.scalar_type()).contiguous();
    if (bias) b = bias->to(x.scalar_type()).contiguous();
    at::Tensor y = at::empty({x2.size(0), n}, x.options());
    if (x2.size(0)) {
        const int rc = awq_cpu_linear(x2.data_ptr(), x2.size(0), k, dtype, (const uint8_t*)w.data_ptr(), n, groups,
                                      group_size, act.defined() ? act.data_ptr() : nullptr,
                                      b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), isa_from_env());
        TORCH_CHECK(rc != -2, "awqtensor CPU kernel: out of memory for its activation buffer");
        TORCH_CHECK(rc == 0, "awqtensor CPU kernel refused the call (code ", rc, ")");
    }
    if (flat) return y;
    auto shape = x.sizes().vec();
    shape.back() = n;
    return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(awqtensor, CPU, m) { m.impl("int4_linear", &int4_linear_cpu); }
