// Runs awqtensor's W4A8 GEMM (awqtensor/ops/cpu_gemm.cpp) on one problem read from stdin and
// writes y to stdout, so that tests/test_w4a8.py can check a cross-compiled build (ARM64
// under qemu) against the x86 build, bit for bit.
// stdin: int64 M, K, N, G, group_size, kernel, has_bias; then x [M, K] fp32, the
// "cpu_blocks" weight [N, G * (8 + 16 nb)], bias [N] fp32? as raw bytes. stdout: y [M, N] fp32.
#include <cstdio>
#include <vector>

#include "cpu_kernel.cpp"
#include "cpu_gemm.cpp"

static bool read(void* p, size_t n) { return std::fread(p, 1, n, stdin) == n; }

int main() {
    int64_t h[7];
    if (!read(h, sizeof h)) return 2;
    const int64_t M = h[0], K = h[1], N = h[2], G = h[3], gs = h[4];
    std::vector<float> x(M * K), bias(h[6] ? N : 0), y(M * N);
    std::vector<uint8_t> w(N * G * (8 + 16 * (gs / 32)));
    if (!read(x.data(), x.size() * 4) || !read(w.data(), w.size()) || !read(bias.data(), bias.size() * 4)) return 2;
    if (!gemm_kernel_supported((int)h[5])) { std::fprintf(stderr, "kernel %d not supported\n", (int)h[5]); return 3; }
    if (w4a8_gemm(x.data(), M, K, w.data(), N, G, gs, h[6] ? bias.data() : nullptr, y.data(), (int)h[5])) return 4;
    return std::fwrite(y.data(), 4, y.size(), stdout) == y.size() ? 0 : 5;
}
