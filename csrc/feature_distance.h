// Shared host-side contract of the fused (E)LatentLPIPS feature distance (cmt_csrc::feature_distance).
//
// d[b] = mean_{h,w} sum_c w_c (f0/(|f0|_c + eps) - f1/(|f1|_c + eps))^2, |.|_c the L2 norm over channels.
// This header holds what the CPU and CUDA implementations must agree on: argument checks, the layout
// policy (kernels read by strides; only overlapping or gapped tensors are copied first) and the
// accumulation dtype. The kernels themselves live in feature_distance_cpu.cpp and cuda/.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>

namespace cmt_csrc {

// float64 accumulates in double (so gradcheck is meaningful); every other dtype in float.
inline c10::ScalarType accumulate_dtype(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

struct Inputs {
  at::Tensor f0, f1;  // [B, C, H, W], non-overlapping and dense (any permutation of dims)
  at::Tensor weight;  // undefined, or [C] contiguous in the accumulation dtype on f0's device
  int64_t B, C, H, W;
};

// Validates and normalises the operands. Dense tensors (contiguous, channels_last or any other dim
// permutation) are used as they are, so gradients come back in the caller's layout; only a tensor with
// gaps or overlaps (e.g. a channel slice) is copied to contiguous memory first.
inline Inputs prepare(const at::Tensor& f0, const at::Tensor& f1, const std::optional<at::Tensor>& weight,
                      c10::DeviceType device_type, const char* backend) {
  TORCH_CHECK(f0.dim() == 4 && f0.sizes() == f1.sizes(),
              "cmt_csrc::feature_distance: feature maps must share one [B, C, H, W] shape, got ",
              f0.sizes(), " and ", f1.sizes());
  TORCH_CHECK(f0.scalar_type() == f1.scalar_type(), "cmt_csrc::feature_distance: f0 is ", f0.scalar_type(),
              " but f1 is ", f1.scalar_type());
  const auto dtype = f0.scalar_type();
  TORCH_CHECK(dtype == c10::kFloat || dtype == c10::kHalf || dtype == c10::kBFloat16 || dtype == c10::kDouble,
              "cmt_csrc::feature_distance: supports float32/float16/bfloat16/float64, got ", dtype);
  TORCH_CHECK(f0.device().type() == device_type && f0.device() == f1.device(), "cmt_csrc::feature_distance (",
              backend, "): both feature maps must be on one ", backend, " device, got ", f0.device(), " and ",
              f1.device());
  Inputs in;
  in.B = f0.size(0);
  in.C = f0.size(1);
  in.H = f0.size(2);
  in.W = f0.size(3);
  TORCH_CHECK(in.C > 0 && in.H * in.W > 0, "cmt_csrc::feature_distance: empty feature maps ", f0.sizes());
  in.f0 = f0.is_non_overlapping_and_dense() ? f0 : f0.contiguous();
  in.f1 = f1.is_non_overlapping_and_dense() ? f1 : f1.contiguous();
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->numel() == in.C, "cmt_csrc::feature_distance: weight has ", weight->numel(),
                " values for ", in.C, " channels");
    in.weight = weight->reshape({-1}).to(f0.device(), accumulate_dtype(dtype)).contiguous();
  }
  return in;
}

inline std::array<int64_t, 4> strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

}  // namespace cmt_csrc
