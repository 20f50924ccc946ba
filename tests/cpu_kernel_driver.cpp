// Runs awqtensor's CPU kernel on one problem read from stdin and writes y to stdout, so
// that tests/test_cpu_kernel.py can check a cross-compiled build (ARM64 under qemu).
// stdin: int64 M, K, N, G, group_size, dtype, isa, has_act_scale, has_bias; then x [M, K],
// the "cpu_blocks" weight [N, G * (8 + 16 nb)], act_scale [K]?, bias [N]? as raw bytes.
#include <cstdio>
#include <vector>

#include "cpu_kernel.cpp"

static bool read(void* p, size_t n) { return std::fread(p, 1, n, stdin) == n; }

int main() {
    int64_t h[9];
    if (!read(h, sizeof h)) return 2;
    const int64_t M = h[0], K = h[1], N = h[2], G = h[3], gs = h[4];
    const size_t elem = h[5] == F32 ? 4 : 2, nb = (gs + 31) / 32;
    std::vector<uint8_t> x(M * K * elem), w(N * G * (8 + 16 * nb)), act(h[7] ? K * elem : 0),
        bias(h[8] ? N * elem : 0), y(M * N * elem);
    if (!read(x.data(), x.size()) || !read(w.data(), w.size()) || !read(act.data(), act.size()) ||
        !read(bias.data(), bias.size()))
        return 2;
    if (!awq_cpu_isa_supported((int)h[6])) { std::fprintf(stderr, "isa %d not supported\n", (int)h[6]); return 3; }
    const int rc = awq_cpu_linear(x.data(), M, K, (int)h[5], w.data(), N, G, gs, h[7] ? act.data() : nullptr,
                                  h[8] ? bias.data() : nullptr, y.data(), (int)h[6]);
    if (rc) return 4;
    return std::fwrite(y.data(), 1, y.size(), stdout) == y.size() ? 0 : 5;
}
