// CPU kernels of cmt_csrc::feature_distance and the op schemas (this file is the kernels._C extension).
//
// Work unit: one sample b and a tile of up to kTile consecutive positions p = h*W + w. Per tile the kernel
// sweeps the channels twice (norms, then the weighted squared difference of the normalised maps); the
// second sweep re-reads a tile that is still in cache, so memory traffic is one read of f0 and f1. Each
// tile writes one partial sum, and the per-sample sum over tiles runs in a fixed order afterwards, so the
// result does not depend on the thread count. Accumulation is in float (double for float64 inputs).
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "feature_distance.h"

namespace cmt_csrc {
namespace {

constexpr int64_t kTile = 64;

// Where the tile's positions live in one map. kLinear: positions are consecutive elements (NCHW with
// unit w-stride and h-stride W), the common case, which the compiler vectorises; otherwise per-position
// offsets (channels_last and other permutations).
template <typename scalar_t, bool kLinear>
struct TileView {
  const scalar_t* base;
  int64_t channel_stride;
  const int64_t* offsets;  // unused when kLinear
  inline int64_t at(int64_t c, int64_t i) const {
    return c * channel_stride + (kLinear ? i : offsets[i]);
  }
};

struct Geometry {
  int64_t B, C, H, W, HW, tiles;
};

inline Geometry geometry_of(const Inputs& in) {
  const int64_t HW = in.H * in.W;
  return {in.B, in.C, in.H, in.W, HW, (HW + kTile - 1) / kTile};
}

// Offsets (excluding the channel term) of positions p0 .. p0+n-1 of sample b in a map with strides s.
inline void position_offsets(const std::array<int64_t, 4>& s, int64_t b, int64_t p0, int64_t n, int64_t W,
                             int64_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = p0 + i;
    out[i] = b * s[0] + (p / W) * s[2] + (p % W) * s[3];
  }
}

inline bool linear_positions(const std::array<int64_t, 4>& s, int64_t W) {
  return s[3] == 1 && s[2] == W;
}

// Grain so a parallel chunk holds ~32k channel-position pairs: tiny tiles (few channels) are batched.
inline int64_t grain_for(const Geometry& g) {
  return std::max<int64_t>(1, 32768 / (kTile * g.C));
}

// Per tile: channel norms -> inverse norms r0, r1 (1 / (|f|+eps)).
template <typename scalar_t, typename acc_t, bool kLinear>
inline void inverse_norms(const TileView<scalar_t, kLinear>& v0, const TileView<scalar_t, kLinear>& v1,
                          int64_t C, int64_t n, acc_t eps, acc_t* norm0, acc_t* norm1, acc_t* r0, acc_t* r1) {
  std::fill(norm0, norm0 + n, acc_t(0));
  std::fill(norm1, norm1 + n, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < n; ++i) {
      const acc_t x = static_cast<acc_t>(v0.base[v0.at(c, i)]);
      const acc_t y = static_cast<acc_t>(v1.base[v1.at(c, i)]);
      norm0[i] += x * x;
      norm1[i] += y * y;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    norm0[i] = std::sqrt(norm0[i]);
    norm1[i] = std::sqrt(norm1[i]);
    r0[i] = acc_t(1) / (norm0[i] + eps);
    r1[i] = acc_t(1) / (norm1[i] + eps);
  }
}

template <typename scalar_t, bool kLinear>
void forward_tiles(const Inputs& in, const Geometry& g, double eps, at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto s0 = strides_of(in.f0), s1 = strides_of(in.f1);
  const scalar_t* p0 = in.f0.data_ptr<scalar_t>();
  const scalar_t* p1 = in.f1.data_ptr<scalar_t>();
  const acc_t* w = in.weight.defined() ? in.weight.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, g.B * g.tiles, grain_for(g), [&](int64_t begin, int64_t end) {
    acc_t norm0[kTile], norm1[kTile], r0[kTile], r1[kTile], d[kTile];
    int64_t off0[kTile], off1[kTile];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / g.tiles, start = (job % g.tiles) * kTile, n = std::min(kTile, g.HW - start);
      TileView<scalar_t, kLinear> v0{p0, s0[1], off0}, v1{p1, s1[1], off1};
      if (kLinear) {
        v0.base += b * s0[0] + start;
        v1.base += b * s1[0] + start;
      } else {
        position_offsets(s0, b, start, n, g.W, off0);
        position_offsets(s1, b, start, n, g.W, off1);
      }
      inverse_norms(v0, v1, g.C, n, static_cast<acc_t>(eps), norm0, norm1, r0, r1);
      std::fill(d, d + n, acc_t(0));
      for (int64_t c = 0; c < g.C; ++c) {
        const acc_t wc = w ? w[c] : acc_t(1);
        for (int64_t i = 0; i < n; ++i) {
          const acc_t u = r0[i] * static_cast<acc_t>(v0.base[v0.at(c, i)]) -
                          r1[i] * static_cast<acc_t>(v1.base[v1.at(c, i)]);
          d[i] += wc * u * u;
        }
      }
      acc_t total = 0;
      for (int64_t i = 0; i < n; ++i) total += d[i];
      partial[job] = total;
    }
  });
}

// d/df0_k = 2 r0 (w_k u_k - (r0/|f0|) f0_k S0), S0 = sum_c w_c u_c f0_c, u = r0 f0 - r1 f1; symmetric for
// f1 with the sign flipped. At |f| = 0 the norm's gradient is taken as 0 (as torch.linalg.vector_norm's).
template <typename scalar_t, bool kLinear>
void backward_tiles(const Inputs& in, const Geometry& g, double eps, const at::Tensor& grad, at::Tensor& g0,
                    at::Tensor& g1) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto s0 = strides_of(in.f0), s1 = strides_of(in.f1);
  const scalar_t* p0 = in.f0.data_ptr<scalar_t>();
  const scalar_t* p1 = in.f1.data_ptr<scalar_t>();
  scalar_t* q0 = g0.defined() ? g0.data_ptr<scalar_t>() : nullptr;  // same strides as f0 (empty_like)
  scalar_t* q1 = g1.defined() ? g1.data_ptr<scalar_t>() : nullptr;
  const acc_t* w = in.weight.defined() ? in.weight.data_ptr<acc_t>() : nullptr;
  const scalar_t* go = grad.data_ptr<scalar_t>();
  at::parallel_for(0, g.B * g.tiles, grain_for(g), [&](int64_t begin, int64_t end) {
    acc_t norm0[kTile], norm1[kTile], r0[kTile], r1[kTile], k0[kTile], k1[kTile], S0[kTile], S1[kTile];
    int64_t off0[kTile], off1[kTile];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / g.tiles, start = (job % g.tiles) * kTile, n = std::min(kTile, g.HW - start);
      int64_t shift0 = 0, shift1 = 0;
      TileView<scalar_t, kLinear> v0{p0, s0[1], off0}, v1{p1, s1[1], off1};
      if (kLinear) {
        shift0 = b * s0[0] + start;
        shift1 = b * s1[0] + start;
        v0.base += shift0;
        v1.base += shift1;
      } else {
        position_offsets(s0, b, start, n, g.W, off0);
        position_offsets(s1, b, start, n, g.W, off1);
      }
      inverse_norms(v0, v1, g.C, n, static_cast<acc_t>(eps), norm0, norm1, r0, r1);
      std::fill(S0, S0 + n, acc_t(0));
      std::fill(S1, S1 + n, acc_t(0));
      for (int64_t c = 0; c < g.C; ++c) {
        const acc_t wc = w ? w[c] : acc_t(1);
        for (int64_t i = 0; i < n; ++i) {
          const acc_t x = static_cast<acc_t>(v0.base[v0.at(c, i)]);
          const acc_t y = static_cast<acc_t>(v1.base[v1.at(c, i)]);
          const acc_t wu = wc * (r0[i] * x - r1[i] * y);
          S0[i] += wu * x;
          S1[i] += wu * y;
        }
      }
      const acc_t coef = acc_t(2) * static_cast<acc_t>(go[b]) / static_cast<acc_t>(g.HW);
      for (int64_t i = 0; i < n; ++i) {
        k0[i] = norm0[i] > 0 ? r0[i] / norm0[i] * S0[i] : acc_t(0);
        k1[i] = norm1[i] > 0 ? r1[i] / norm1[i] * S1[i] : acc_t(0);
      }
      for (int64_t c = 0; c < g.C; ++c) {
        const acc_t wc = w ? w[c] : acc_t(1);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t a0 = v0.at(c, i), a1 = v1.at(c, i);
          const acc_t x = static_cast<acc_t>(v0.base[a0]);
          const acc_t y = static_cast<acc_t>(v1.base[a1]);
          const acc_t wu = wc * (r0[i] * x - r1[i] * y);
          if (q0) q0[shift0 + a0] = static_cast<scalar_t>(coef * r0[i] * (wu - k0[i] * x));
          if (q1) q1[shift1 + a1] = static_cast<scalar_t>(-coef * r1[i] * (wu - k1[i] * y));
        }
      }
    }
  });
}

// Calls fn with std::true_type when both maps have linear positions (see TileView), else std::false_type.
template <typename Fn>
void with_layout(const Inputs& in, Fn&& fn) {
  if (linear_positions(strides_of(in.f0), in.W) && linear_positions(strides_of(in.f1), in.W)) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

at::Tensor forward_cpu(const at::Tensor& f0, const at::Tensor& f1, const std::optional<at::Tensor>& weight,
                       double eps) {
  const Inputs in = prepare(f0, f1, weight, c10::DeviceType::CPU, "cpu");
  const Geometry g = geometry_of(in);
  at::Tensor out = at::empty({g.B}, f0.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "feature_distance_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partial(g.B * g.tiles);
    with_layout(in, [&](auto linear) {
      forward_tiles<scalar_t, decltype(linear)::value>(in, g, eps, partial.data());
    });
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t b = 0; b < g.B; ++b) {
      acc_t total = 0;
      for (int64_t t = 0; t < g.tiles; ++t) total += partial[b * g.tiles + t];
      o[b] = static_cast<scalar_t>(total / static_cast<acc_t>(g.HW));
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& f0, const at::Tensor& f1,
                                                const std::optional<at::Tensor>& weight, double eps, bool need_f0,
                                                bool need_f1) {
  const Inputs in = prepare(f0, f1, weight, c10::DeviceType::CPU, "cpu");
  TORCH_CHECK(grad.numel() == in.B, "cmt_csrc::feature_distance_backward: grad has ", grad.numel(),
              " values for ", in.B, " samples");
  const Geometry g = geometry_of(in);
  const at::Tensor go = grad.to(f0.scalar_type()).contiguous();
  at::Tensor g0 = need_f0 ? at::empty_like(in.f0) : at::Tensor();
  at::Tensor g1 = need_f1 ? at::empty_like(in.f1) : at::Tensor();
  if (need_f0 || need_f1) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "feature_distance_backward_cpu", [&] {
      with_layout(in, [&](auto linear) {
        backward_tiles<scalar_t, decltype(linear)::value>(in, g, eps, go, g0, g1);
      });
    });
  }
  return {g0, g1};
}

}  // namespace

TORCH_LIBRARY(cmt_csrc, m) {
  m.def("feature_distance(Tensor f0, Tensor f1, Tensor? weight, float eps) -> Tensor");
  m.def(
      "feature_distance_backward(Tensor grad, Tensor f0, Tensor f1, Tensor? weight, float eps, bool need_f0, "
      "bool need_f1) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cmt_csrc, CPU, m) {
  m.impl("feature_distance", &forward_cpu);
  m.impl("feature_distance_backward", &backward_cpu);
}

}  // namespace cmt_csrc

// `import kernels._C` loads this library, which runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
