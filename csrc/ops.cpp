// C++ CPU kernels of the fused CDM ops: the "cpp" backend of cdm_kernels.
//
// Same op schemas as the Triton custom ops (cdm_kernels::*), defined here in the namespace
// cdm_kernels_cpp and implemented for the CPU dispatch key. The fake (meta) functions and the
// autograd formulas are attached from Python (cdm_kernels/ops/utils.py: define_op), so these
// ops are differentiable and traceable by torch.compile exactly like the Triton ones.
//
// Structure: every kernel walks (sample, tile) work items in parallel (at::parallel_for); a
// tile is TILE consecutive elements of one sample, converted to fp32 in a small buffer when
// the input is bf16/fp16 (fp32 inputs are read in place), then processed by simple
// vectorisable loops. Reductions write one partial sum per (sample, chunk) and add them in a
// fixed order afterwards, so results do not depend on the number of threads.
//
// Layout: a tensor is read as base + b * batch_stride + i (i = row-major index inside a
// sample); one whose per-sample part is not contiguous is copied with .contiguous() first.
// Seeded noise: element j of the logical layout is Philox-4x32-10 (key = seed, counter =
// offset + j) + Box-Muller in fp32 with libm, the generator of cdm_kernels/reference/philox.py
// and of Triton's tl.randn (uniforms bitwise equal; the normal differs only by libm rounding).

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

namespace {

constexpr int64_t TILE = 2048;
constexpr int64_t CHUNK_TILES = 8;  // reductions: one partial sum per 8 tiles of a sample
constexpr float INF = std::numeric_limits<float>::infinity();

using OptTensor = std::optional<at::Tensor>;

bool inner_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

struct Rows {
  at::Tensor t;  // keeps a contiguous copy alive when one was needed
  const char* base = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t bstride = 0;
  int64_t n = 0;
};

Rows make_rows(const at::Tensor& t0) {
  TORCH_CHECK(t0.device().is_cpu(), "cdm_kernels_cpp: expected CPU tensors");
  auto st = t0.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "cdm_kernels_cpp: supported dtypes are float32, bfloat16, float16");
  Rows r;
  r.t = inner_contiguous(t0) ? t0 : t0.contiguous();
  r.base = static_cast<const char*>(r.t.data_ptr());
  r.dtype = st;
  r.bstride = r.t.size(0) > 1 ? r.t.stride(0) : 0;
  r.n = r.t.size(0) > 0 ? r.t.numel() / r.t.size(0) : 0;
  return r;
}

// Pointer to `len` fp32 values of sample b from element i0 (in place for fp32, else converted).
inline const float* load(const Rows& r, int64_t b, int64_t i0, int64_t len, float* buf) {
  const int64_t off = b * r.bstride + i0;
  if (r.dtype == at::kFloat) return reinterpret_cast<const float*>(r.base) + off;
  if (r.dtype == at::kBFloat16) {
    const auto* p = reinterpret_cast<const c10::BFloat16*>(r.base) + off;
    for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<float>(p[j]);
  } else {
    const auto* p = reinterpret_cast<const c10::Half*>(r.base) + off;
    for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<float>(p[j]);
  }
  return buf;
}

// Destination of `len` fp32 results at element offset `off` of a contiguous output.
struct Out {
  at::Tensor t;
  at::ScalarType dtype;
  inline float* target(int64_t off, float* buf) const {
    return dtype == at::kFloat ? t.data_ptr<float>() + off : buf;
  }
  inline void commit(const float* src, int64_t off, int64_t len) const {
    if (dtype == at::kBFloat16) {
      auto* p = reinterpret_cast<c10::BFloat16*>(t.data_ptr()) + off;
      for (int64_t j = 0; j < len; ++j) p[j] = c10::BFloat16(src[j]);  // round to nearest even
    } else if (dtype == at::kHalf) {
      auto* p = reinterpret_cast<c10::Half*>(t.data_ptr()) + off;
      for (int64_t j = 0; j < len; ++j) p[j] = c10::Half(src[j]);
    }
  }
};

Out make_out(const at::Tensor& like, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "cdm_kernels_cpp: supported output dtypes are float32, bfloat16, float16");
  return Out{at::empty(like.sizes(), like.options().dtype(dtype)), dtype};
}

// Per-sample sigma values (a Python float, or a tensor of 1 or B values of any float dtype).
std::vector<double> sigma_values(const OptTensor& t, double value, int64_t batch) {
  std::vector<double> out(batch, value);
  if (t.has_value()) {
    auto f = t->detach().to(at::kFloat).contiguous().reshape(-1);
    const float* p = f.data_ptr<float>();
    const int64_t m = f.numel();
    TORCH_CHECK(m == 1 || m == batch, "cdm_kernels_cpp: sigma must hold 1 or B values");
    for (int64_t b = 0; b < batch; ++b) out[b] = p[m == 1 ? 0 : b];
  }
  return out;
}

// Per-sample upstream gradient of a loss: scalar (mean: / B, sum) or (B,) ("none").
std::vector<double> loss_grad_values(const at::Tensor& g, std::string_view reduction, int64_t batch) {
  auto f = g.detach().to(at::kFloat).contiguous().reshape(-1);
  const float* p = f.data_ptr<float>();
  const bool per_sample = reduction == "none";
  const double scale = reduction == "mean" ? 1.0 / static_cast<double>(batch) : 1.0;
  std::vector<double> out(batch);
  for (int64_t b = 0; b < batch; ++b) out[b] = p[per_sample ? b : 0] * scale;
  return out;
}

// ---------------------------------------------------------------------------- Philox noise

constexpr uint32_t KEY_A = 0x9E3779B9u, KEY_B = 0xBB67AE85u;
constexpr uint32_t ROUND_A = 0xD2511F53u, ROUND_B = 0xCD9E8D57u;

inline float uint_to_uniform(uint32_t r) {
  int32_t x = static_cast<int32_t>(r);
  if (x < 0) x = ~x;  // -x - 1 without overflow
  return static_cast<float>(x) * 4.6566127342e-10f;
}

inline float philox_randn(uint64_t seed, uint32_t counter) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = static_cast<uint64_t>(ROUND_A) * c0;
    const uint64_t pb = static_cast<uint64_t>(ROUND_B) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += KEY_A;
    k1 += KEY_B;
  }
  const float u1 = std::max(uint_to_uniform(c0), 1.0e-7f);
  const float u2 = uint_to_uniform(c1);
  const float theta = 6.283185307179586f * u2;
  const float radius = std::sqrt(-2.0f * std::log(u1));
  return radius * std::cos(theta);
}

// Fills buf[j] = noise element (offset + base + j).
inline const float* noise_tile(uint64_t seed, int64_t offset, int64_t base, int64_t len, float* buf) {
  const uint32_t start = static_cast<uint32_t>(offset + base);
  for (int64_t j = 0; j < len; ++j) buf[j] = philox_randn(seed, start + static_cast<uint32_t>(j));
  return buf;
}

// ---------------------------------------------------------------------------- drivers

struct Scratch {
  std::vector<float> a, b, c, d, e, o1, o2;
  Scratch() : a(TILE), b(TILE), c(TILE), d(TILE), e(TILE), o1(TILE), o2(TILE) {}
};

// f(b, i0, len, scratch) for every tile of every sample, in parallel.
template <typename F>
void for_each_tile(int64_t batch, int64_t n, const F& f) {
  const int64_t tiles = (n + TILE - 1) / TILE;
  at::parallel_for(0, batch * tiles, 4, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / tiles, i0 = (w % tiles) * TILE;
      f(b, i0, std::min(TILE, n - i0), s);
    }
  });
}

// ---------------------------------------------------------------------------- elementwise ops

at::Tensor sigma_lincomb(const at::Tensor& g1, const OptTensor& g2, const OptTensor& s1_t, double s1,
                         const OptTensor& s2_t, double s2, double c0, double c1, double c2, double d0, double d1,
                         double d2, int64_t seed, int64_t offset, at::ScalarType out_dtype) {
  Out out = make_out(g1, out_dtype);
  if (g1.numel() == 0) return out.t;
  const int64_t batch = g1.size(0);
  Rows r1 = make_rows(g1);
  Rows r2 = g2.has_value() ? make_rows(*g2) : Rows{};
  const int mode = g2.has_value() ? 1 : (seed >= 0 ? 2 : 0);
  const auto S1 = sigma_values(s1_t, s1, batch), S2 = sigma_values(s2_t, s2, batch);
  const int64_t n = r1.n;
  for_each_tile(batch, n, [&](int64_t b, int64_t i0, int64_t len, Scratch& s) {
    const float ca = static_cast<float>(c0 + c1 * S1[b] + c2 * S2[b]);
    const float cb = static_cast<float>(d0 + d1 * S1[b] + d2 * S2[b]);
    const float* x = load(r1, b, i0, len, s.a.data());
    float* o = out.target(b * n + i0, s.o1.data());
    if (mode == 0) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) o[j] = ca * x[j];
    } else {
      const float* y = mode == 1 ? load(r2, b, i0, len, s.b.data())
                                 : noise_tile(static_cast<uint64_t>(seed), offset, b * n + i0, len, s.b.data());
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) o[j] = ca * x[j] + cb * y[j];
    }
    out.commit(o, b * n + i0, len);
  });
  return out.t;
}

std::tuple<at::Tensor, at::Tensor> euler_step(const at::Tensor& x, const at::Tensor& v, const OptTensor& sf_t,
                                              double sf, const OptTensor& st_t, double st) {
  Out next = make_out(x, x.scalar_type()), x0 = make_out(x, x.scalar_type());
  if (x.numel() == 0) return {next.t, x0.t};
  const int64_t batch = x.size(0);
  Rows rx = make_rows(x), rv = make_rows(v);
  const auto SF = sigma_values(sf_t, sf, batch), ST = sigma_values(st_t, st, batch);
  const int64_t n = rx.n;
  for_each_tile(batch, n, [&](int64_t b, int64_t i0, int64_t len, Scratch& s) {
    const float f = static_cast<float>(SF[b]), t = static_cast<float>(ST[b]);
    const float dt = t - f;
    const float* xp = load(rx, b, i0, len, s.a.data());
    const float* vp = load(rv, b, i0, len, s.b.data());
    float* o1 = next.target(b * n + i0, s.o1.data());
    float* o2 = x0.target(b * n + i0, s.o2.data());
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      o1[j] = xp[j] + dt * vp[j];
      o2[j] = xp[j] - f * vp[j];
    }
    next.commit(o1, b * n + i0, len);
    x0.commit(o2, b * n + i0, len);
  });
  return {next.t, x0.t};
}

std::tuple<at::Tensor, at::Tensor> predict_x0_renoise(const at::Tensor& xt, const at::Tensor& v,
                                                      const OptTensor& noise, const OptTensor& s_t, double s,
                                                      const OptTensor& st_t, double st, int64_t seed,
                                                      int64_t offset) {
  Out x0 = make_out(xt, xt.scalar_type()), xtt = make_out(xt, xt.scalar_type());
  if (xt.numel() == 0) return {x0.t, xtt.t};
  const int64_t batch = xt.size(0);
  Rows rx = make_rows(xt), rv = make_rows(v);
  Rows rn = noise.has_value() ? make_rows(*noise) : Rows{};
  const auto S = sigma_values(s_t, s, batch), STv = sigma_values(st_t, st, batch);
  const int64_t n = rx.n;
  for_each_tile(batch, n, [&](int64_t b, int64_t i0, int64_t len, Scratch& sc) {
    const float sb = static_cast<float>(S[b]), tb = static_cast<float>(STv[b]);
    const float keep = 1.0f - tb;
    const float* xp = load(rx, b, i0, len, sc.a.data());
    const float* vp = load(rv, b, i0, len, sc.b.data());
    const float* ep = noise.has_value()
                          ? load(rn, b, i0, len, sc.c.data())
                          : noise_tile(static_cast<uint64_t>(seed), offset, b * n + i0, len, sc.c.data());
    float* o1 = x0.target(b * n + i0, sc.o1.data());
    float* o2 = xtt.target(b * n + i0, sc.o2.data());
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float x0j = xp[j] - sb * vp[j];
      o1[j] = x0j;
      o2[j] = keep * x0j + tb * ep[j];
    }
    x0.commit(o1, b * n + i0, len);
    xtt.commit(o2, b * n + i0, len);
  });
  return {x0.t, xtt.t};
}

// ---------------------------------------------------------------------------- losses

// Per (sample, chunk) partial sums: f(b, i0, len, scratch, acc[K]) adds a tile's sums into acc.
template <int K, typename F>
std::vector<double> per_sample_sums(int64_t batch, int64_t n, const F& f) {
  const int64_t chunk = TILE * CHUNK_TILES;
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<double> part(static_cast<size_t>(batch * chunks * K), 0.0);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / chunks, c0 = (w % chunks) * chunk, c1 = std::min(n, c0 + chunk);
      double* acc = part.data() + w * K;
      for (int64_t i0 = c0; i0 < c1; i0 += TILE) f(b, i0, std::min(TILE, c1 - i0), s, acc);
    }
  });
  std::vector<double> sums(static_cast<size_t>(batch * K), 0.0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < chunks; ++c)
      for (int k = 0; k < K; ++k) sums[b * K + k] += part[(b * chunks + c) * K + k];
  return sums;
}

at::Tensor reduce_losses(const std::vector<double>& per_sample, std::string_view reduction,
                         const at::TensorOptions& opts) {
  const int64_t batch = static_cast<int64_t>(per_sample.size());
  if (reduction == "none") {
    auto out = at::empty({batch}, opts.dtype(at::kFloat));
    for (int64_t b = 0; b < batch; ++b) out.data_ptr<float>()[b] = static_cast<float>(per_sample[b]);
    return out;
  }
  double total = 0.0;
  for (double l : per_sample) total += l;
  if (reduction == "mean") total /= static_cast<double>(batch);
  auto out = at::empty({}, opts.dtype(at::kFloat));
  *out.data_ptr<float>() = static_cast<float>(total);
  return out;
}

std::tuple<at::Tensor, at::Tensor> score_difference(const at::Tensor& student_v, const at::Tensor& a_v,
                                                    const at::Tensor& b_v, const at::Tensor& xt,
                                                    const at::Tensor& xt_teacher, const OptTensor& s_t, double s,
                                                    const OptTensor& st_t, double st, double scale,
                                                    double norm_clip_min, c10::string_view reduction_) {
  const std::string_view reduction(reduction_.data(), reduction_.size());
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", "bad reduction");
  const int64_t batch = student_v.size(0);
  Rows rs = make_rows(student_v), ra = make_rows(a_v), rb = make_rows(b_v), rx = make_rows(xt),
       rt = make_rows(xt_teacher);
  const auto S = sigma_values(s_t, s, batch), STv = sigma_values(st_t, st, batch);
  const int64_t n = rs.n;
  // sums per sample: |x0_a - x0_s|, d^2, #non-finite d, #non-finite x0_s
  const auto sums = per_sample_sums<4>(batch, n, [&](int64_t b, int64_t i0, int64_t len, Scratch& sc, double* acc) {
    const float sb = static_cast<float>(S[b]), tb = static_cast<float>(STv[b]);
    const float* sv = load(rs, b, i0, len, sc.a.data());
    const float* av = load(ra, b, i0, len, sc.b.data());
    const float* bv = load(rb, b, i0, len, sc.c.data());
    const float* xv = load(rx, b, i0, len, sc.d.data());
    const float* tv = load(rt, b, i0, len, sc.e.data());
    float s_abs = 0.f, s_sq = 0.f, n_bad = 0.f, n_sbad = 0.f;
#pragma omp simd reduction(+ : s_abs, s_sq, n_bad, n_sbad)
    for (int64_t j = 0; j < len; ++j) {
      const float x0s = xv[j] - sb * sv[j];
      const float x0a = tv[j] - tb * av[j];
      const float d = tb * (bv[j] - av[j]);
      s_abs += std::fabs(x0a - x0s);
      s_sq += d * d;
      n_bad += std::fabs(d) < INF ? 0.f : 1.f;
      n_sbad += std::fabs(x0s) < INF ? 0.f : 1.f;
    }
    acc[0] += s_abs;
    acc[1] += s_sq;
    acc[2] += n_bad;
    acc[3] += n_sbad;
  });
  auto opts = student_v.options();
  auto coef = at::empty({batch}, opts.dtype(at::kFloat));
  std::vector<double> losses(batch);
  const double nd = static_cast<double>(n);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t b = 0; b < batch; ++b) {
    const double s_abs = sums[b * 4], s_sq = sums[b * 4 + 1], n_bad = sums[b * 4 + 2], n_sbad = sums[b * 4 + 3];
    const double norm = std::max(s_abs / nd + 1e-8, norm_clip_min);
    const bool ok = n_bad == 0.0 && std::isfinite(s_abs);
    double loss = ok ? scale * scale * s_sq / (norm * norm) / nd : 0.0;
    double k = ok ? 2.0 * scale / (norm * nd) : 0.0;
    if (n_sbad > 0.0) loss = k = nan;
    losses[b] = loss;
    coef.data_ptr<float>()[b] = static_cast<float>(k);
  }
  return {reduce_losses(losses, reduction, opts), coef};
}

at::Tensor score_difference_backward(const at::Tensor& grad_loss, const at::Tensor& coef, const at::Tensor& a_v,
                                     const at::Tensor& b_v, const OptTensor& s_t, double s, const OptTensor& st_t,
                                     double st, c10::string_view reduction_, double alpha, double beta,
                                     at::ScalarType out_dtype) {
  const std::string_view reduction(reduction_.data(), reduction_.size());
  Out out = make_out(a_v, out_dtype);
  if (a_v.numel() == 0) return out.t;
  const int64_t batch = a_v.size(0);
  Rows ra = make_rows(a_v), rb = make_rows(b_v);
  const auto S = sigma_values(s_t, s, batch), STv = sigma_values(st_t, st, batch);
  const auto G = loss_grad_values(grad_loss, reduction, batch);
  auto k = coef.detach().to(at::kFloat).contiguous();
  const float* kp = k.data_ptr<float>();
  const int64_t n = ra.n;
  for_each_tile(batch, n, [&](int64_t b, int64_t i0, int64_t len, Scratch& sc) {
    float* o = out.target(b * n + i0, sc.o1.data());
    if (kp[b] == 0.0f) {  // shift zeroed (non-finite teacher): exactly zero, even where d is not finite
      std::fill(o, o + len, 0.0f);
    } else {
      const float factor = static_cast<float>((alpha + beta * S[b]) * kp[b] * G[b]);
      const float tb = static_cast<float>(STv[b]);
      const float* av = load(ra, b, i0, len, sc.a.data());
      const float* bv = load(rb, b, i0, len, sc.b.data());
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) o[j] = factor * (tb * (bv[j] - av[j]));
    }
    out.commit(o, b * n + i0, len);
  });
  return out.t;
}

at::Tensor flow_matching(const at::Tensor& pred_v, const at::Tensor& x0, const OptTensor& noise, int64_t seed,
                         int64_t offset, c10::string_view reduction_) {
  const std::string_view reduction(reduction_.data(), reduction_.size());
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", "bad reduction");
  const int64_t batch = pred_v.size(0);
  Rows rp = make_rows(pred_v), rx = make_rows(x0);
  Rows rn = noise.has_value() ? make_rows(*noise) : Rows{};
  const int64_t n = rp.n;
  const auto sums = per_sample_sums<1>(batch, n, [&](int64_t b, int64_t i0, int64_t len, Scratch& sc, double* acc) {
    const float* p = load(rp, b, i0, len, sc.a.data());
    const float* x = load(rx, b, i0, len, sc.b.data());
    const float* e = noise.has_value()
                         ? load(rn, b, i0, len, sc.c.data())
                         : noise_tile(static_cast<uint64_t>(seed), offset, b * n + i0, len, sc.c.data());
    float sq = 0.f;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < len; ++j) {
      const float r = p[j] - (e[j] - x[j]);
      sq += r * r;
    }
    acc[0] += sq;
  });
  std::vector<double> losses(batch);
  for (int64_t b = 0; b < batch; ++b) losses[b] = sums[b] / static_cast<double>(n);
  return reduce_losses(losses, reduction, pred_v.options());
}

at::Tensor flow_matching_backward(const at::Tensor& grad_loss, const at::Tensor& pred_v, const at::Tensor& x0,
                                  const OptTensor& noise, int64_t seed, int64_t offset,
                                  c10::string_view reduction_) {
  const std::string_view reduction(reduction_.data(), reduction_.size());
  Out out = make_out(pred_v, pred_v.scalar_type());
  if (pred_v.numel() == 0) return out.t;
  const int64_t batch = pred_v.size(0);
  Rows rp = make_rows(pred_v), rx = make_rows(x0);
  Rows rn = noise.has_value() ? make_rows(*noise) : Rows{};
  const auto G = loss_grad_values(grad_loss, reduction, batch);
  const int64_t n = rp.n;
  for_each_tile(batch, n, [&](int64_t b, int64_t i0, int64_t len, Scratch& sc) {
    const float factor = static_cast<float>(2.0 * G[b] / static_cast<double>(n));
    const float* p = load(rp, b, i0, len, sc.a.data());
    const float* x = load(rx, b, i0, len, sc.b.data());
    const float* e = noise.has_value()
                         ? load(rn, b, i0, len, sc.c.data())
                         : noise_tile(static_cast<uint64_t>(seed), offset, b * n + i0, len, sc.c.data());
    float* o = out.target(b * n + i0, sc.o1.data());
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) o[j] = factor * (p[j] - (e[j] - x[j]));
    out.commit(o, b * n + i0, len);
  });
  return out.t;
}

}  // namespace

// Schemas: keep identical to the *_SCHEMA strings of cdm_kernels/ops/*.py (a test compares them).
TORCH_LIBRARY(cdm_kernels_cpp, m) {
  m.def(
      "sigma_lincomb(Tensor g1, Tensor? g2, Tensor? s1_t, float s1, Tensor? s2_t, float s2, float c0, float c1, "
      "float c2, float d0, float d1, float d2, int seed, int offset, ScalarType out_dtype) -> Tensor");
  m.def("euler_step(Tensor x, Tensor v, Tensor? sf_t, float sf, Tensor? st_t, float st) -> (Tensor, Tensor)");
  m.def(
      "predict_x0_renoise(Tensor xt, Tensor v, Tensor? noise, Tensor? s_t, float s, Tensor? st_t, float st, "
      "int seed, int offset) -> (Tensor, Tensor)");
  m.def(
      "score_difference(Tensor student_v, Tensor a_v, Tensor b_v, Tensor xt, Tensor xt_teacher, Tensor? s_t, "
      "float s, Tensor? st_t, float st, float scale, float norm_clip_min, str reduction) -> (Tensor, Tensor)");
  m.def(
      "score_difference_backward(Tensor grad_loss, Tensor coef, Tensor a_v, Tensor b_v, Tensor? s_t, float s, "
      "Tensor? st_t, float st, str reduction, float alpha, float beta, ScalarType out_dtype) -> Tensor");
  m.def("flow_matching(Tensor pred_v, Tensor x0, Tensor? noise, int seed, int offset, str reduction) -> Tensor");
  m.def(
      "flow_matching_backward(Tensor grad_loss, Tensor pred_v, Tensor x0, Tensor? noise, int seed, int offset, "
      "str reduction) -> Tensor");
}

TORCH_LIBRARY_IMPL(cdm_kernels_cpp, CPU, m) {
  m.impl("sigma_lincomb", &sigma_lincomb);
  m.impl("euler_step", &euler_step);
  m.impl("predict_x0_renoise", &predict_x0_renoise);
  m.impl("score_difference", &score_difference);
  m.impl("score_difference_backward", &score_difference_backward);
  m.impl("flow_matching", &flow_matching);
  m.impl("flow_matching_backward", &flow_matching_backward);
}

// `import cdm_kernels._C` runs the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "cdm_kernels C++ CPU kernels", -1, nullptr};
  return PyModule_Create(&module);
}
