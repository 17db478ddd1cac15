// Launchers of the CUDA feature-distance kernels, in plain C++ types so that only
// feature_distance_kernel.cu goes through nvcc (and it includes no torch header: fast CUDA builds).
#pragma once

#include <array>
#include <cstdint>

namespace cmt_csrc {
namespace cuda {

enum class DType { kFloat, kHalf, kBFloat16, kDouble };

struct Problem {
  int64_t B, C, H, W;
  std::array<int64_t, 4> s0, s1;  // element strides (b, c, h, w) of f0 and f1; gradients share them
  bool channel_lanes;             // channels are f0's fastest dim (channels_last): lanes run over channels
};

// Positions per thread block: 32 (lanes over positions, 8 channel groups) or 8 (lanes over channels).
inline int64_t positions_per_block(bool channel_lanes) { return channel_lanes ? 8 : 32; }
inline int64_t tiles_of(const Problem& p) {
  const int64_t per = positions_per_block(p.channel_lanes);
  return (p.H * p.W + per - 1) / per;
}

// Both return nullptr on success, else the CUDA error string of the failed launch.
// partial: [B * tiles_of(p)] in the accumulation type (double for kDouble, else float); out: [B] in dtype.
const char* launch_forward(DType dtype, const Problem& p, const void* f0, const void* f1, const void* weight,
                           double eps, void* partial, void* out, void* stream);
// grad: [B] contiguous in dtype; g0 / g1 may be null (gradient not needed).
const char* launch_backward(DType dtype, const Problem& p, const void* grad, const void* f0, const void* f1,
                            const void* weight, double eps, void* g0, void* g1, void* stream);

}  // namespace cuda
}  // namespace cmt_csrc
