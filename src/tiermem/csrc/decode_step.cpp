// One decode step of a Llama-family model in one call: every decoder layer for one token of each row of a batch
// (tiermem.decode_step).
//
// Why: a Python decode step of SmolLM2 dispatches ~2,900 small operations, and on a 2-core CPU that dispatch, not
// the weights' bytes, is most of the step (BENCHMARKS.md, "Where a 512-token step goes"). Here the small work of a
// layer (RMSNorm, RoPE, the KV append with its int8 encode, attention over the stored rows, SiLU, residual adds)
// runs as plain loops over a few hundred floats (kernels.h), and only the four weight GEMVs per layer go through
// PyTorch's own kernels (_weight_int4pack_mm_for_cpu / _weight_int8pack_mm, the Python path's); the int8 LM head has
// its own kernel where the build has AVX-512BW (kernels.h: head_int8), PyTorch's otherwise. This is the role of llama.cpp's graph or gpt-fast's compiled decode step; torch.compile gained nothing on
// this path (BENCHMARKS.md), so the step is written out.
//
// Numerics: the residual stream stays in float32 between layers (the Python path rounds it to bf16 after every
// add), each GEMV's input is rounded to bf16 as the kernels take it, attention and its softmax run in float32 (exp
// by Cephes' polynomial on AVX-512). KV rows are stored exactly as tiermem.kvstore.quant encodes them (int8: D values
// then a float32 scale, absmax / 127, round half to even), so a cache filled here reads the same everywhere else.
#include <torch/extension.h>

#include <vector>

#include "kernels.h"

namespace {

using at::BFloat16;
using namespace tiermem;

struct Linear {
  at::Tensor weight, scales;
  int64_t group;  // > 0: int4 packed with (K / group, N, 2) scales and zeros; 0: int8 with (N,) scales

  at::Tensor operator()(const at::Tensor& x) const {
    return group > 0 ? at::_weight_int4pack_mm_for_cpu(x, weight, group, scales)
                     : at::_weight_int8pack_mm(x, weight, scales);
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;  // (D,) float32
  Linear qkv, o, gate_up, down;
};

// One row's KV block of one layer, as tiermem.kvstore.dense.KVBuffer holds it.
struct Block {
  const at::Tensor &keys, &values, &positions;  // (1, Hkv, capacity, W) int8 or bf16; (Hkv, capacity) int64
  int64_t slot;                                 // where this step's token goes (the tokens stored before it)
};

class Decoder {
 public:
  // weights: per layer, in order, input_norm, qkv weight, qkv scales, o weight, o scales, post_norm, gate_up weight,
  // gate_up scales, down weight, down scales (10 each); groups: qkv, o, gate_up, down per layer (4 each). embed
  // (vocab, D) bf16; final_norm (D,) float32; the head int8 with bf16 scales.
  Decoder(const std::vector<at::Tensor>& weights, const std::vector<int64_t>& groups, at::Tensor embed,
          at::Tensor final_norm, at::Tensor head_weight, at::Tensor head_scales, int64_t num_heads,
          int64_t num_kv_heads, int64_t head_dim, int64_t intermediate, double eps, double scaling)
      : embed_(std::move(embed)),
        final_norm_(std::move(final_norm)),
        head_{std::move(head_weight), std::move(head_scales), 0},
        hq_(num_heads),
        hkv_(num_kv_heads),
        dh_(head_dim),
        inter_(intermediate),
        eps_(static_cast<float>(eps)),
        scaling_(static_cast<float>(scaling)) {
    TORCH_CHECK(weights.size() == groups.size() / 4 * 10 && groups.size() % 4 == 0, "decoder: bad layer lists");
    for (size_t l = 0; l < groups.size() / 4; ++l) {
      const at::Tensor* t = weights.data() + l * 10;
      const int64_t* g = groups.data() + l * 4;
      layers_.push_back(Layer{t[0], t[5], {t[1], t[2], g[0]}, {t[3], t[4], g[1]}, {t[6], t[7], g[2]},
                              {t[8], t[9], g[3]}});
    }
  }

  // One token per row through every layer; the rows share the GEMVs (one call of M = B rows per weight) and each
  // attends its own cache. kv: per row, per layer, keys, values, positions (3 * B * L); slots: per row, per layer,
  // the tokens stored before this step (B * L); cos and sin (B, head_dim) float32. Returns logits (B, vocab).
  at::Tensor step(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                  const std::vector<at::Tensor>& kv, const std::vector<int64_t>& slots, const at::Tensor& cos,
                  const at::Tensor& sin) {
    const int64_t rows = static_cast<int64_t>(tokens.size()), nl = static_cast<int64_t>(layers_.size());
    const int64_t d = embed_.size(1), hq = hq_, hkv = hkv_, dh = dh_;
    TORCH_CHECK(positions.size() == tokens.size() && slots.size() == tokens.size() * layers_.size() &&
                    kv.size() == 3 * slots.size(),
                "decoder: one position per row, one block per row and layer");
    std::vector<float> x(rows * d), q(hq * dh), kvrow(2 * hkv * dh), attn(hq * dh);
    for (int64_t r = 0; r < rows; ++r) {
      const BFloat16* e = embed_.data_ptr<BFloat16>() + tokens[r] * d;
      for (int64_t i = 0; i < d; ++i) x[r * d + i] = static_cast<float>(e[i]);
    }
    at::Tensor h = at::empty({rows, d}, at::kBFloat16), a = at::empty({rows, hq * dh}, at::kBFloat16);
    at::Tensor act = at::empty({rows, inter_}, at::kBFloat16);
    BFloat16 *hp = h.data_ptr<BFloat16>(), *ap = a.data_ptr<BFloat16>(), *actp = act.data_ptr<BFloat16>();
    for (int64_t li = 0; li < nl; ++li) {
      const Layer& l = layers_[li];
      for (int64_t r = 0; r < rows; ++r) rms_norm(&x[r * d], l.input_norm.data_ptr<float>(), eps_, d, hp + r * d);
      const at::Tensor qkv_out = l.qkv(h);  // (B, (Hq + 2 Hkv) * dh), held: its data is read below
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t at_ = r * nl + li;
        const Block block{kv[3 * at_], kv[3 * at_ + 1], kv[3 * at_ + 2], slots[at_]};
        const BFloat16* qkv = qkv_out.data_ptr<BFloat16>() + r * qkv_out.size(1);
        for (int64_t i = 0; i < hq * dh; ++i) q[i] = static_cast<float>(qkv[i]);
        for (int64_t i = 0; i < 2 * hkv * dh; ++i) kvrow[i] = static_cast<float>(qkv[hq * dh + i]);
        const float *c = cos.data_ptr<float>() + r * dh, *s = sin.data_ptr<float>() + r * dh;
        for (int64_t i = 0; i < hq; ++i) rope(q.data() + i * dh, c, s, dh);
        for (int64_t i = 0; i < hkv; ++i) rope(kvrow.data() + i * dh, c, s, dh);
        append_and_attend(block, positions[r], kvrow.data(), q.data(), attn.data());
        for (int64_t i = 0; i < hq * dh; ++i) ap[r * hq * dh + i] = BFloat16(attn[i]);
      }
      add(x.data(), l.o(a), rows * d);
      for (int64_t r = 0; r < rows; ++r) rms_norm(&x[r * d], l.post_norm.data_ptr<float>(), eps_, d, hp + r * d);
      const at::Tensor gu_out = l.gate_up(h);  // (B, 2 * intermediate): gate then up
      const BFloat16* gu = gu_out.data_ptr<BFloat16>();
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < inter_; ++i) {
          const float gate = static_cast<float>(gu[r * 2 * inter_ + i]);
          const float up = static_cast<float>(gu[r * 2 * inter_ + inter_ + i]);
          actp[r * inter_ + i] = BFloat16(gate / (1.f + std::exp(-gate)) * up);
        }
      }
      add(x.data(), l.down(act), rows * d);
    }
    for (int64_t r = 0; r < rows; ++r) rms_norm(&x[r * d], final_norm_.data_ptr<float>(), eps_, d, hp + r * d);
#if defined(__AVX512BW__)
    const int64_t n = head_.weight.size(0), k = head_.weight.size(1);
    if (k % 32 == 0 && k <= 8192 && n % 4 == 0) return head_int8(h, head_.weight, head_.scales);
#endif
    return head_(h).to(at::kFloat);
  }

 private:
  // Store this token's rotated key and value (kv: Hkv keys then Hkv values) at the block's slot and attend the
  // block's slot + 1 rows with the rotated queries q (Hq, dh); out (Hq, dh).
  void append_and_attend(const Block& b, int64_t position, const float* kv, const float* q, float* out) const {
    const int64_t capacity = b.keys.size(2), width = b.keys.size(3);
    TORCH_CHECK(b.slot < capacity && b.keys.is_contiguous() && b.values.is_contiguous(), "decoder: bad KV block");
    int64_t* pos = b.positions.data_ptr<int64_t>();
    for (int64_t i = 0; i < hkv_; ++i) pos[i * b.positions.size(1) + b.slot] = position;
    if (b.keys.scalar_type() == at::kChar) {
      append_and_attend(b.keys.data_ptr<int8_t>(), b.values.data_ptr<int8_t>(), kv, q, capacity, b.slot, width, out);
    } else {
      TORCH_CHECK(b.keys.scalar_type() == at::kBFloat16, "decoder: KV rows must be int8 or bfloat16");
      append_and_attend(b.keys.data_ptr<BFloat16>(), b.values.data_ptr<BFloat16>(), kv, q, capacity, b.slot, width,
                        out);
    }
  }

  template <typename T>
  void append_and_attend(T* keys, T* values, const float* kv, const float* q, int64_t capacity, int64_t slot,
                         int64_t width, float* out) const {
    for (int64_t i = 0; i < hkv_; ++i) {
      store_row(kv + i * dh_, dh_, keys + (i * capacity + slot) * width);
      store_row(kv + (hkv_ + i) * dh_, dh_, values + (i * capacity + slot) * width);
    }
    attend(q, keys, values, hkv_, capacity, slot + 1, dh_, width, hq_ / hkv_, scaling_, out);
  }

  static void add(float* x, const at::Tensor& y, int64_t n) {
    const BFloat16* p = y.data_ptr<BFloat16>();
    for (int64_t i = 0; i < n; ++i) x[i] += static_cast<float>(p[i]);
  }

  std::vector<Layer> layers_;
  at::Tensor embed_, final_norm_;
  Linear head_;
  int64_t hq_, hkv_, dh_, inter_;
  float eps_, scaling_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<const std::vector<at::Tensor>&, const std::vector<int64_t>&, at::Tensor, at::Tensor,
                          at::Tensor, at::Tensor, int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("step", &Decoder::step, pybind11::call_guard<pybind11::gil_scoped_release>());
#if defined(__AVX512BW__)
  m.def("head_int8", &head_int8, pybind11::call_guard<pybind11::gil_scoped_release>());
#endif
}
