// The small kernels of tiermem's fused decode step (decode_step.cpp): RMSNorm, RoPE, the KV row encode, attention
// over stored int8 / bf16 rows (flash-decoding's split over threads) and the int8 LM head. Plain loops, vectorized
// with AVX-512 where the build has it; the plain forms are the reference.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace tiermem {

using at::BFloat16;

constexpr int64_t kTokenGrain = 128;  // tokens per parallel task in attention

// RMSNorm of x (d) times w, rounded once to bf16 (tiermem.norms' one-rounding form).
void rms_norm(const float* x, const float* w, float eps, int64_t d, BFloat16* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = BFloat16(x[i] * r * w[i]);
}

// HF's half-split RoPE of one head vector x (d), in place.
void rope(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

float row_scale(const int8_t* row, int64_t d) {
  float s;
  std::memcpy(&s, row + d, sizeof s);
  return s;
}
float row_scale(const BFloat16*, int64_t) { return 1.f; }

// One stored row from x (d): int8 values then their float32 scale, as tiermem.kvstore.quant.KVFormat.encode.
void store_row(const float* x, int64_t d, int8_t* row) {
  float amax = 0.f;
  for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = std::max(amax / 127.f, FLT_MIN);
  for (int64_t i = 0; i < d; ++i) row[i] = static_cast<int8_t>(std::nearbyint(x[i] / scale));
  std::memcpy(row + d, &scale, sizeof scale);
}
void store_row(const float* x, int64_t d, BFloat16* row) {
  for (int64_t i = 0; i < d; ++i) row[i] = BFloat16(x[i]);
}

// Scores of `group` queries q (group, d) against one KV head's rows [begin, end): lg[g * n + j], times the row's
// scale and `scaling`. The plain loop is the reference; AVX-512 builds take the vectorized one for d = 64 or 128.
template <typename T>
void scores_plain(const float* q, const T* rows, int64_t width, int64_t begin, int64_t end, int64_t group,
                  int64_t d, float scaling, float* lg, int64_t n) {
  for (int64_t j = begin; j < end; ++j) {
    const T* row = rows + j * width;
    const float s = row_scale(row, d) * scaling;
    for (int64_t g = 0; g < group; ++g) {
      const float* qv = q + g * d;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < d; ++i) acc += qv[i] * static_cast<float>(row[i]);
      lg[g * n + j] = acc * s;
    }
  }
}

// acc (group, d) += sum over rows [begin, end) of p[g * n + j] * row scale * row.
template <typename T>
void values_plain(const float* p, const T* rows, int64_t width, int64_t begin, int64_t end, int64_t group,
                  int64_t d, int64_t n, float* acc) {
  for (int64_t j = begin; j < end; ++j) {
    const T* row = rows + j * width;
    const float vs = row_scale(row, d);
    for (int64_t g = 0; g < group; ++g) {
      const float w = p[g * n + j] * vs;
      float* o = acc + g * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] += w * static_cast<float>(row[i]);
    }
  }
}

#if defined(__AVX512F__)
// 16 stored values widened to float32.
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// scores_plain with each row widened once into registers and shared by the group's queries.
template <int D, typename T>
void scores_simd(const float* q, const T* rows, int64_t width, int64_t begin, int64_t end, int64_t group,
                 float scaling, float* lg, int64_t n) {
  constexpr int V = D / 16;
  for (int64_t j = begin; j < end; ++j) {
    const T* row = rows + j * width;
    __m512 r[V];
    for (int v = 0; v < V; ++v) r[v] = load16(row + 16 * v);
    const float s = row_scale(row, D) * scaling;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * D;
      __m512 acc = _mm512_mul_ps(r[0], _mm512_loadu_ps(qg));
      for (int v = 1; v < V; ++v) acc = _mm512_fmadd_ps(r[v], _mm512_loadu_ps(qg + 16 * v), acc);
      lg[g * n + j] = _mm512_reduce_add_ps(acc) * s;
    }
  }
}

// values_plain with the accumulators of up to four queries held in registers across the rows.
template <int D, typename T>
void values_simd(const float* p, const T* rows, int64_t width, int64_t begin, int64_t end, int64_t group,
                 int64_t n, float* acc) {
  constexpr int V = D / 16;
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const int64_t gs = std::min<int64_t>(4, group - g0);
    __m512 a[4][V];
    for (int64_t g = 0; g < gs; ++g)
      for (int v = 0; v < V; ++v) a[g][v] = _mm512_loadu_ps(acc + (g0 + g) * D + 16 * v);
    for (int64_t j = begin; j < end; ++j) {
      const T* row = rows + j * width;
      __m512 r[V];
      for (int v = 0; v < V; ++v) r[v] = load16(row + 16 * v);
      const float vs = row_scale(row, D);
      for (int64_t g = 0; g < gs; ++g) {
        const __m512 w = _mm512_set1_ps(p[(g0 + g) * n + j] * vs);
        for (int v = 0; v < V; ++v) a[g][v] = _mm512_fmadd_ps(w, r[v], a[g][v]);
      }
    }
    for (int64_t g = 0; g < gs; ++g)
      for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + (g0 + g) * D + 16 * v, a[g][v]);
  }
}

// exp(x) for x <= 0, Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial for e^r, times 2^n (about
// 1 ulp; inputs below -87.3 give about 1e-38 instead of a denormal or 0, which no softmax sum notices).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// x[i] = exp(x[i] - m) for i < n; returns their sum.
float exp_sum(float* x, int64_t n, float m) {
  float sum = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - m));
  return sum;
}

#if defined(__AVX512BW__)
// The LM head, y (B, N) float32 = x (B, K) times the int8 rows W (N, K) scaled per row by s (N,) (bf16). PyTorch's
// int8 kernel reads SmolLM2's 28 MB head at about 10 GB/s for one row; here x is scaled to int16 (absmax / 32767,
// finer than its own bf16 digits) and each row's products are summed exactly in int32 by AVX-512's int16 multiply-
// add, four rows of W per load of x. Needs K a multiple of 32 and at most 8192: each int32 lane adds K / 32 pairs
// of products of at most 127 * 32767, which stays below 2^31.
at::Tensor head_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  const int64_t rows = x.size(0), n = w.size(0), k = w.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  std::vector<int16_t> xq(rows * k);
  std::vector<float> xs(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xf.data_ptr<float>() + r * k;
    float amax = 0.f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(xr[i]));
    xs[r] = std::max(amax / 32767.f, FLT_MIN);
    for (int64_t i = 0; i < k; ++i) xq[r * k + i] = static_cast<int16_t>(std::nearbyint(xr[i] / xs[r]));
  }
  at::Tensor y = at::empty({rows, n}, at::kFloat);
  const int8_t* wp = w.data_ptr<int8_t>();
  const BFloat16* sp = s.data_ptr<BFloat16>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n / 4, 256, [&](int64_t first, int64_t last) {
    for (int64_t r = 0; r < rows; ++r) {
      const int16_t* xr = xq.data() + r * k;
      for (int64_t b = first; b < last; ++b) {
        const int8_t* w0 = wp + 4 * b * k;
        __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                        _mm512_setzero_si512()};
        for (int64_t i = 0; i < k; i += 32) {
          const __m512i xv = _mm512_loadu_si512(xr + i);
          for (int j = 0; j < 4; ++j) {
            const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + j * k + i)));
            a[j] = _mm512_add_epi32(a[j], _mm512_madd_epi16(wv, xv));
          }
        }
        for (int j = 0; j < 4; ++j) {
          const float dot = static_cast<float>(_mm512_reduce_add_epi32(a[j]));
          yp[r * n + 4 * b + j] = dot * xs[r] * static_cast<float>(sp[4 * b + j]);
        }
      }
    }
  });
  return y;
}
#endif

template <typename T>
void scores(const float* q, const T* rows, int64_t width, int64_t begin, int64_t end, int64_t group, int64_t d,
            float scaling, float* lg, int64_t n) {
#if defined(__AVX512F__)
  if (d == 64) return scores_simd<64>(q, rows, width, begin, end, group, scaling, lg, n);
  if (d == 128) return scores_simd<128>(q, rows, width, begin, end, group, scaling, lg, n);
#endif
  scores_plain(q, rows, width, begin, end, group, d, scaling, lg, n);
}

template <typename T>
void values(const float* p, const T* rows, int64_t width, int64_t begin, int64_t end, int64_t group, int64_t d,
            int64_t n, float* acc) {
#if defined(__AVX512F__)
  if (d == 64) return values_simd<64>(p, rows, width, begin, end, group, n, acc);
  if (d == 128) return values_simd<128>(p, rows, width, begin, end, group, n, acc);
#endif
  values_plain(p, rows, width, begin, end, group, d, n, acc);
}

// Attention of hq = hkv * group rotated queries q (hq, d) over n stored rows per KV head; out (hq, d). The tokens are
// split into one span per thread (flash-decoding): each span's scores, softmax numerators against the span's own
// maximum and weighted values in one pass, then the spans merged by log-sum-exp.
template <typename T>
void attend(const float* q, const T* keys, const T* vals, int64_t hkv, int64_t capacity, int64_t n, int64_t d,
            int64_t width, int64_t group, float scaling, float* out) {
  const int64_t hq = hkv * group;
  const int64_t spans = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kTokenGrain));
  const int64_t per = (n + spans - 1) / spans;
  std::vector<float> lg(static_cast<size_t>(hq * n)), peak(spans * hq), total(spans * hq);
  std::vector<float> acc(static_cast<size_t>(spans * hq * d), 0.f);
  at::parallel_for(0, spans, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * per, end = std::min(n, begin + per);
      for (int64_t h = 0; h < hkv; ++h)
        scores(q + h * group * d, keys + h * capacity * width, width, begin, end, group, d, scaling,
               lg.data() + h * group * n, n);
      for (int64_t i = 0; i < hq; ++i) {
        float* row = lg.data() + i * n + begin;
        const float m = *std::max_element(row, row + (end - begin));
        peak[c * hq + i] = m;
        total[c * hq + i] = exp_sum(row, end - begin, m);
      }
      for (int64_t h = 0; h < hkv; ++h)
        values(lg.data() + h * group * n, vals + h * capacity * width, width, begin, end, group, d, n,
               acc.data() + (c * hq + h * group) * d);
    }
  });
  for (int64_t i = 0; i < hq; ++i) {
    float m = peak[i];
    for (int64_t c = 1; c < spans; ++c) m = std::max(m, peak[c * hq + i]);
    float denominator = 0.f;
    std::fill(out + i * d, out + (i + 1) * d, 0.f);
    for (int64_t c = 0; c < spans; ++c) {
      const float w = std::exp(peak[c * hq + i] - m);
      denominator += w * total[c * hq + i];
      const float* a = acc.data() + (c * hq + i) * d;
      for (int64_t k = 0; k < d; ++k) out[i * d + k] += w * a[k];
    }
    for (int64_t k = 0; k < d; ++k) out[i * d + k] /= denominator;
  }
}

}  // namespace tiermem
