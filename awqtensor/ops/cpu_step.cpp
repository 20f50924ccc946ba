// torch.classes.awqtensor.DecodePlan: one decode step of a Llama-family model (Llama,
// Mistral, Qwen2, Qwen3: pre-norm RMSNorm blocks, rotary q/k, SiLU-gated MLP) on the CPU,
// in C++ from the token to the logits. Included by cpu_op.cpp (inside its namespace; the
// headers it needs are included there).
//
// A compiled decode step of SmolLM2-135M spends about a third of its time between the
// kernels (Inductor's Python wrapper, the compiled region, ~300 small calls a token); here
// a step is one call from Python: per layer four int4 GEMMs (awq_cpu_linear into buffers
// of the step; int4_linear_cpu where its dense route would serve), the attention kernel
// above, and loops over a few hundred floats for the norms, rotary embedding, cache write,
// SiLU and residuals. The arithmetic is that of transformers' modules in fp32;
// awqtensor/native.py builds a plan only for the models and weights it checks
// (``native.unsupported`` says why not), so nothing here guesses at a model's structure.

// One Linear: int4 "cpu_blocks" (scales defined), or a float weight. `doubled`: the
// 8-bit head's halves [V, 2H], multiplied by [x, x] (awqtensor/head.py).
struct PlanLinear {
    at::Tensor weight, scales, act_scale, bias;
    int64_t group_size = 0;
    bool doubled = false;

    bool defined() const { return weight.defined(); }
    int64_t out_features() const { return weight.size(0); }

    // y [M, N] (row stride N) = x [M, K] @ W.T (+ bias), all fp32. The int8 kernel
    // straight into y where int4_linear_cpu would run it too, else through that function.
    void operator()(const at::Tensor& x, float* y) const {
        const int64_t M = x.size(0), N = out_features();
        const at::Tensor in = doubled ? at::cat({x, x}, 1) : x;
        const int64_t K = in.size(1);
        if (scales.defined() && !takes_dense_route(M, N, K)) {
            const int rc = awq_cpu_linear(in.data_ptr(), M, K, F32, (const uint8_t*)weight.data_ptr(), N, scales.size(1),
                                          group_size, act_scale.defined() ? act_scale.data_ptr() : nullptr,
                                          bias.defined() ? bias.data_ptr() : nullptr, y, isa_from_env());
            TORCH_CHECK(rc == 0, "awqtensor CPU kernel refused the call (code ", rc, ")");
            return;
        }
        at::Tensor out;
        if (scales.defined()) {
            auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
            out = int4_linear_cpu(in, weight, scales, std::nullopt, opt(act_scale), opt(bias), group_size, "cpu_blocks");
        } else {
            out = bias.defined() ? at::linear(in, weight, bias) : at::linear(in, weight);
        }
        std::memcpy(y, out.contiguous().data_ptr<float>(), sizeof(float) * M * N);
    }
};

// y = x / sqrt(mean(x^2) + eps) * w over n floats (transformers' RMSNorm in fp32).
void rms_norm(const float* x, const float* w, int64_t n, double eps, float* y) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += (double)x[i] * x[i];
    const float inv = (float)(1.0 / std::sqrt(sum / (double)n + eps));
    for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

// out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[D/2:], x[:D/2]].
void rotate(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    for (int64_t i = half; i < D; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

class DecodePlan : public torch::CustomClassHolder {
  public:
    // Seven Linears a layer (q, k, v, o, gate, up, down; k, v and up empty where fused
    // into q and gate) then the head, each as four tensors (weight, scales, act_scale,
    // bias; an empty tensor = absent) with one group size; four norms a layer (input,
    // post-attention, q, k: the last two Qwen3's) then the final one; three cache tensors a
    // layer (keys, values [B, KVH, L, D], transformers' cumulative_length); the embedding
    // (float [V, H], or the 8-bit head's halves with their scales); cos/sin [L, D];
    // dims = (heads, kv heads, head size, embedding group size, head doubled).
    DecodePlan(std::vector<at::Tensor> linears, std::vector<int64_t> group_sizes, std::vector<at::Tensor> norms,
               std::vector<at::Tensor> cache, at::Tensor embed, at::Tensor embed_scales, at::Tensor cos,
               at::Tensor sin, std::vector<int64_t> dims, double eps, double scale)
        : embed_(embed.contiguous()), cos_(cos.contiguous()), sin_(sin.contiguous()), eps_(eps), scale_(scale) {
        TORCH_CHECK(dims.size() == 5, "DecodePlan: dims = (heads, kv_heads, head_dim, embed_group_size, head_doubled)");
        heads_ = dims[0], kv_heads_ = dims[1], head_dim_ = dims[2], embed_group_size_ = dims[3];
        layers_ = (int64_t)cache.size() / 3;
        TORCH_CHECK(layers_ > 0 && (int64_t)cache.size() == 3 * layers_ && (int64_t)linears.size() == 4 * (7 * layers_ + 1) &&
                        (int64_t)group_sizes.size() == 7 * layers_ + 1 && (int64_t)norms.size() == 4 * layers_ + 1,
                    "DecodePlan: ", layers_, " layers need ", 4 * (7 * layers_ + 1), " linear tensors, ", 7 * layers_ + 1,
                    " group sizes and ", 4 * layers_ + 1, " norms");
        TORCH_CHECK(heads_ > 0 && kv_heads_ > 0 && heads_ % kv_heads_ == 0 && head_dim_ % 2 == 0,
                    "DecodePlan: bad head counts or head size");
        TORCH_CHECK(cos_.dim() == 2 && cos_.size(1) == head_dim_ && sin_.sizes() == cos_.sizes() &&
                        cos_.scalar_type() == at::kFloat && sin_.scalar_type() == at::kFloat,
                    "DecodePlan: cos/sin must be fp32 [L, ", head_dim_, "]");
        auto present = [](const at::Tensor& t) { return t.numel() ? t.contiguous() : at::Tensor(); };
        for (size_t i = 0; i < group_sizes.size(); ++i) {
            PlanLinear l{present(linears[4 * i]), present(linears[4 * i + 1]), present(linears[4 * i + 2]),
                         present(linears[4 * i + 3]), group_sizes[i], false};
            if (l.act_scale.defined()) l.act_scale = l.act_scale.to(at::kFloat);
            if (l.bias.defined()) l.bias = l.bias.to(at::kFloat);
            linears_.push_back(l);
        }
        linears_.back().doubled = dims[4] != 0;
        for (const auto& n : norms) norms_.push_back(present(n));
        for (int64_t l = 0; l < layers_; ++l) {
            for (int j = 0; j < 2; ++j) {
                const at::Tensor& c = cache[3 * l + j];
                TORCH_CHECK(c.dim() == 4 && c.sizes() == cache[0].sizes() && c.size(1) == kv_heads_ &&
                                c.size(3) == head_dim_ && c.is_contiguous() && c.scalar_type() == at::kFloat &&
                                c.size(2) <= cos_.size(0),
                            "DecodePlan: layer ", l, "'s cache is not a contiguous fp32 [B, ", kv_heads_, ", L, ", head_dim_,
                            "] within the rotary table");
            }
            TORCH_CHECK(cache[3 * l + 2].scalar_type() == at::kLong && cache[3 * l + 2].numel() == 1,
                        "DecodePlan: cumulative_length must be one int64");
        }
        cache_ = std::move(cache);
        embed_scales_ = present(embed_scales);
        for (int64_t l = 0; l < layers_; ++l) {  // the widest output of a layer's Linears; the MLP's width
            for (int j = 0; j < 7; ++j)
                if (linears_[7 * l + j].defined()) widest_ = std::max(widest_, linears_[7 * l + j].out_features());
            const int64_t inter = linears_[7 * l + 5].defined() ? linears_[7 * l + 4].out_features()
                                                                : linears_[7 * l + 4].out_features() / 2;
            TORCH_CHECK(l == 0 || inter == inter_, "DecodePlan: layers of different MLP widths");
            inter_ = inter;
        }
    }

    // For tokens [B] or [B, 1] at `position` (every row's), the cache filled at that
    // position: the logits [B, V], or with `greedy` the most likely next tokens [B, 1].
    at::Tensor step(const at::Tensor& tokens, int64_t position, bool greedy) {
        const at::Tensor ids = tokens.reshape({-1}).to(at::kLong).contiguous();
        const int64_t B = ids.size(0), L = cache_[0].size(2), D = head_dim_, H = heads_, KVH = kv_heads_;
        TORCH_CHECK(B == cache_[0].size(0), "DecodePlan: ", B, " tokens for a cache of batch ", cache_[0].size(0));
        TORCH_CHECK(position >= 0 && position < L, "DecodePlan: position ", position, " outside the cache (", L, ")");
        const at::Tensor x = embedding(ids);
        const int64_t hidden = x.size(1);
        const auto f32 = x.options();
        const at::Tensor h = at::empty({B, hidden}, f32), q = at::empty({B, H, 1, D}, f32);
        const at::Tensor proj = at::empty({B, std::max(widest_, hidden)}, f32), act = at::empty({B, inter_}, f32);
        float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *pp = proj.data_ptr<float>();
        float* ap = act.data_ptr<float>();
        const int64_t width = proj.size(1);
        std::vector<float> tmp(D), k_out, v_out, u_out;
        const float* cos = cos_.data_ptr<float>() + position * D;
        const float* sin = sin_.data_ptr<float>() + position * D;
        // x += f(h) row by row, f's output [B, N] in proj
        auto add_to_x = [&](int64_t n) {
            for (int64_t b = 0; b < B; ++b)
                for (int64_t c = 0; c < n; ++c) xp[b * hidden + c] += pp[b * width + c];
        };
        // a Linear into a [B, N] buffer of its own (the unfused k, v, up)
        auto separate = [&](const PlanLinear& l, std::vector<float>& out) {
            out.resize(B * l.out_features());
            l(h, out.data());
            return out.data();
        };
        for (int64_t l = 0; l < layers_; ++l) {
            const PlanLinear* lin = &linears_[7 * l];
            const at::Tensor* norm = &norms_[4 * l];
            normed(xp, B, hidden, norm[0], hp);
            // q, k, v: one fused output [B, (H + 2 KVH) D] in proj, or three
            strided(lin[0], h, pp, width);
            const float* ko = lin[1].defined() ? separate(lin[1], k_out) : pp + H * D;
            const float* vo = lin[2].defined() ? separate(lin[2], v_out) : pp + (H + KVH) * D;
            const int64_t kv_stride = lin[1].defined() ? KVH * D : width;
            float* keys = cache_[3 * l].data_ptr<float>();
            float* values = cache_[3 * l + 1].data_ptr<float>();
            for (int64_t b = 0; b < B; ++b) {
                for (int64_t i = 0; i < H; ++i) {
                    const float* src = pp + b * width + i * D;
                    if (norm[2].defined()) rms_norm(src, norm[2].data_ptr<float>(), D, eps_, tmp.data()), src = tmp.data();
                    rotate(src, cos, sin, D, q.data_ptr<float>() + (b * H + i) * D);
                }
                for (int64_t i = 0; i < KVH; ++i) {
                    const int64_t slot = ((b * KVH + i) * L + position) * D;
                    const float* src = ko + b * kv_stride + i * D;
                    if (norm[3].defined()) rms_norm(src, norm[3].data_ptr<float>(), D, eps_, tmp.data()), src = tmp.data();
                    rotate(src, cos, sin, D, keys + slot);
                    std::memcpy(values + slot, vo + b * kv_stride + i * D, sizeof(float) * D);
                }
            }
            *cache_[3 * l + 2].data_ptr<int64_t>() = position + 1;
            const at::Tensor mixed = attention(q, cache_[3 * l], cache_[3 * l + 1], std::nullopt, scale_, position + 1);
            strided(lin[3], mixed.view({B, H * D}), pp, width);
            add_to_x(hidden);
            normed(xp, B, hidden, norm[1], hp);
            // gate, up: one fused output [B, 2 I] in proj, or two
            strided(lin[4], h, pp, width);
            const float* up = lin[5].defined() ? separate(lin[5], u_out) : pp + inter_;
            const int64_t up_stride = lin[5].defined() ? inter_ : width;
            for (int64_t b = 0; b < B; ++b)
                for (int64_t i = 0; i < inter_; ++i) {
                    const float g = pp[b * width + i];
                    ap[b * inter_ + i] = g / (1.0f + std::exp(-g)) * up[b * up_stride + i];
                }
            strided(lin[6], act, pp, width);
            add_to_x(hidden);
        }
        normed(xp, B, hidden, norms_.back(), hp);
        const PlanLinear& head = linears_.back();
        at::Tensor logits = at::empty({B, head.out_features()}, f32);
        head(h, logits.data_ptr<float>());
        if (!greedy) return logits;
        at::Tensor next = at::empty({B, 1}, ids.options());
        const int64_t V = logits.size(1);
        for (int64_t b = 0; b < B; ++b) {  // the first maximum, as torch.argmax; NaN wins, as there
            const float* row = logits.data_ptr<float>() + b * V;
            int64_t best = 0;
            for (int64_t v = 1; v < V && !std::isnan(row[best]); ++v)
                if (row[v] > row[best] || std::isnan(row[v])) best = v;
            next.data_ptr<int64_t>()[b] = best;
        }
        return next;
    }

  private:
    // x [B, n] -> y [B, n], RMSNorm with weight w
    void normed(const float* x, int64_t B, int64_t n, const at::Tensor& w, float* y) const {
        for (int64_t b = 0; b < B; ++b) rms_norm(x + b * n, w.data_ptr<float>(), n, eps_, y + b * n);
    }

    // a Linear's [B, N] output into rows of `stride` floats at y (contiguous when N = stride)
    static void strided(const PlanLinear& l, const at::Tensor& x, float* y, int64_t stride) {
        const int64_t B = x.size(0), N = l.out_features();
        if (N == stride || B == 1) return l(x, y);
        std::vector<float> out(B * N);
        l(x, out.data());
        for (int64_t b = 0; b < B; ++b) std::memcpy(y + b * stride, out.data() + b * N, sizeof(float) * N);
    }

    // the embedding rows of ids, [B, H] fp32
    at::Tensor embedding(const at::Tensor& ids) const {
        const int64_t B = ids.size(0), V = embed_.size(0);
        const int64_t* id = ids.data_ptr<int64_t>();
        for (int64_t b = 0; b < B; ++b)
            TORCH_CHECK(id[b] >= 0 && id[b] < V, "DecodePlan: token ", id[b], " outside the vocabulary (", V, ")");
        if (!embed_scales_.defined()) return embed_.index_select(0, ids).to(at::kFloat).contiguous();
        // the 8-bit head's halves: each row dequantized as [hi, lo] and summed (exact)
        const int64_t wide = 2 * (embed_scales_.size(1) * embed_group_size_ / 2), H = wide / 2;
        at::Tensor out = at::empty({B, H}, ids.options().dtype(at::kFloat));
        std::vector<float> row(wide);
        const int64_t row_bytes = embed_.size(1);
        for (int64_t b = 0; b < B; ++b) {
            const int rc = awq_cpu_dequantize((const uint8_t*)embed_.data_ptr() + id[b] * row_bytes, 1, wide,
                                              embed_scales_.size(1), embed_group_size_, F32, row.data(), isa_from_env());
            TORCH_CHECK(rc == 0, "awqtensor CPU kernel: dequantization refused (code ", rc, ")");
            float* o = out.data_ptr<float>() + b * H;
            for (int64_t c = 0; c < H; ++c) o[c] = row[c] + row[H + c];
        }
        return out;
    }

    std::vector<PlanLinear> linears_;
    std::vector<at::Tensor> norms_, cache_;
    at::Tensor embed_, embed_scales_, cos_, sin_;
    int64_t layers_ = 0, heads_ = 0, kv_heads_ = 0, head_dim_ = 0, embed_group_size_ = 0, widest_ = 0, inter_ = 0;
    double eps_, scale_;
};

const auto decode_plan_class =
    torch::class_<DecodePlan>("awqtensor", "DecodePlan")
        .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                         at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<int64_t>, double, double>())
        .def("step", &DecodePlan::step);
