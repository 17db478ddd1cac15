// CUDA kernels of cmt_csrc::feature_distance (forward, per-sample reduction, backward).
//
// A block of 32x8 threads owns a tile of positions of one sample (blockIdx.y = b). Each position is served
// by a group of threads that split its channels; which axis the 32 lanes of a warp run along follows the
// memory layout so that loads coalesce:
//   - NCHW-like (positions fastest): lanes = 32 consecutive positions, threadIdx.y = 8 channel groups;
//     per-position channel sums are reduced through shared memory.
//   - channels_last (channels fastest): lanes = 32 channel groups, threadIdx.y = 8 positions; channel sums
//     are reduced with warp shuffles.
// Every thread keeps fp32 (fp64 for double) accumulators and re-reads its channels per sweep (norms, then
// distance; backward adds a third sweep), which the block has just loaded, so the re-reads hit L1/L2.
// Per-sample totals are a fixed-order two-stage reduction (tile partials, then one block per sample) rather
// than atomics, so results are deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "feature_distance_kernel.h"

namespace cmt_csrc {
namespace cuda {
namespace {

constexpr int kLanes = 32, kRows = 8;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

struct Strides { int64_t b, c, h, w; };

template <bool kChannelLanes> struct Layout {
  static constexpr int kPositions = kChannelLanes ? kRows : kLanes;  // positions per block
  static constexpr int kGroups = kChannelLanes ? kLanes : kRows;     // threads per position
  __device__ static int position() { return kChannelLanes ? threadIdx.y : threadIdx.x; }
  __device__ static int group() { return kChannelLanes ? threadIdx.x : threadIdx.y; }
};

// Sum of v over the threads that share this thread's position. Every thread of the block must call it.
template <bool kChannelLanes, typename acc_t>
__device__ __forceinline__ acc_t sum_over_groups(acc_t v, acc_t* scratch) {
  if (kChannelLanes) {
    for (int o = kLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
  scratch[threadIdx.y * kLanes + threadIdx.x] = v;
  __syncthreads();
  acc_t total = 0;
  for (int k = 0; k < kRows; ++k) total += scratch[k * kLanes + threadIdx.x];
  __syncthreads();
  return total;
}

// Sum of v over the whole 32x8 block, valid in thread (0, 0). Every thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  for (int o = kLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) scratch[threadIdx.y] = v;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0 && threadIdx.y == 0)
    for (int k = 0; k < kRows; ++k) total += scratch[k];
  return total;
}

// The thread's position: whether it exists and its offset (without the channel term) in each map.
struct Position {
  bool valid;
  int64_t off0, off1;
};

template <bool kChannelLanes>
__device__ __forceinline__ Position locate(int64_t H, int64_t W, const Strides& s0, const Strides& s1) {
  const int64_t b = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * Layout<kChannelLanes>::kPositions + Layout<kChannelLanes>::position();
  const bool valid = p < H * W;
  const int64_t h = valid ? p / W : 0, w = valid ? p % W : 0;
  return {valid, b * s0.b + h * s0.h + w * s0.w, b * s1.b + h * s1.h + w * s1.w};
}

template <typename scalar_t, bool kChannelLanes>
__global__ void __launch_bounds__(kLanes * kRows)
forward_kernel(const scalar_t* __restrict__ f0, Strides s0, const scalar_t* __restrict__ f1, Strides s1,
               const typename Acc<scalar_t>::type* __restrict__ weight, int64_t C, int64_t H, int64_t W,
               typename Acc<scalar_t>::type eps, typename Acc<scalar_t>::type* __restrict__ partial) {
  using acc_t = typename Acc<scalar_t>::type;
  using L = Layout<kChannelLanes>;
  __shared__ acc_t scratch[kLanes * kRows];
  const Position pos = locate<kChannelLanes>(H, W, s0, s1);
  acc_t q0 = 0, q1 = 0;
  if (pos.valid) {
    for (int64_t c = L::group(); c < C; c += L::kGroups) {
      const acc_t x = to_acc(f0[pos.off0 + c * s0.c]), y = to_acc(f1[pos.off1 + c * s1.c]);
      q0 += x * x;
      q1 += y * y;
    }
  }
  const acc_t r0 = acc_t(1) / (sqrt(sum_over_groups<kChannelLanes>(q0, scratch)) + eps);
  const acc_t r1 = acc_t(1) / (sqrt(sum_over_groups<kChannelLanes>(q1, scratch)) + eps);
  acc_t d = 0;
  if (pos.valid) {
    for (int64_t c = L::group(); c < C; c += L::kGroups) {
      const acc_t u = r0 * to_acc(f0[pos.off0 + c * s0.c]) - r1 * to_acc(f1[pos.off1 + c * s1.c]);
      d += (weight ? weight[c] : acc_t(1)) * u * u;
    }
  }
  d = block_sum(d, scratch);
  if (threadIdx.x == 0 && threadIdx.y == 0) partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = d;
}

// out[b] = sum of sample b's tile partials / (H*W), one block per sample, fixed summation order.
template <typename scalar_t>
__global__ void __launch_bounds__(kLanes * kRows)
finalize_kernel(const typename Acc<scalar_t>::type* __restrict__ partial, int64_t tiles, int64_t HW,
                scalar_t* __restrict__ out) {
  using acc_t = typename Acc<scalar_t>::type;
  __shared__ acc_t scratch[kRows];
  const int64_t b = blockIdx.x;
  acc_t v = 0;
  for (int64_t t = threadIdx.y * kLanes + threadIdx.x; t < tiles; t += kLanes * kRows) v += partial[b * tiles + t];
  v = block_sum(v, scratch);
  if (threadIdx.x == 0 && threadIdx.y == 0) store(out + b, v / static_cast<acc_t>(HW));
}

// d/df0_k = 2 r0 (w_k u_k - (r0/|f0|) f0_k S0), S0 = sum_c w_c u_c f0_c, u = r0 f0 - r1 f1, times
// grad[b]/(H*W); symmetric for f1 with the sign flipped. The norm's gradient is 0 at |f| = 0.
template <typename scalar_t, bool kChannelLanes>
__global__ void __launch_bounds__(kLanes * kRows)
backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ f0, Strides s0,
                const scalar_t* __restrict__ f1, Strides s1, const typename Acc<scalar_t>::type* __restrict__ weight,
                int64_t C, int64_t H, int64_t W, typename Acc<scalar_t>::type eps, scalar_t* __restrict__ g0,
                scalar_t* __restrict__ g1) {
  using acc_t = typename Acc<scalar_t>::type;
  using L = Layout<kChannelLanes>;
  __shared__ acc_t scratch[kLanes * kRows];
  const Position pos = locate<kChannelLanes>(H, W, s0, s1);
  acc_t q0 = 0, q1 = 0;
  if (pos.valid) {
    for (int64_t c = L::group(); c < C; c += L::kGroups) {
      const acc_t x = to_acc(f0[pos.off0 + c * s0.c]), y = to_acc(f1[pos.off1 + c * s1.c]);
      q0 += x * x;
      q1 += y * y;
    }
  }
  const acc_t n0 = sqrt(sum_over_groups<kChannelLanes>(q0, scratch));
  const acc_t n1 = sqrt(sum_over_groups<kChannelLanes>(q1, scratch));
  const acc_t r0 = acc_t(1) / (n0 + eps), r1 = acc_t(1) / (n1 + eps);
  acc_t S0 = 0, S1 = 0;
  if (pos.valid) {
    for (int64_t c = L::group(); c < C; c += L::kGroups) {
      const acc_t x = to_acc(f0[pos.off0 + c * s0.c]), y = to_acc(f1[pos.off1 + c * s1.c]);
      const acc_t wu = (weight ? weight[c] : acc_t(1)) * (r0 * x - r1 * y);
      S0 += wu * x;
      S1 += wu * y;
    }
  }
  S0 = sum_over_groups<kChannelLanes>(S0, scratch);
  S1 = sum_over_groups<kChannelLanes>(S1, scratch);
  if (!pos.valid) return;  // no block-wide synchronisation below this point
  const acc_t coef = acc_t(2) * to_acc(grad[blockIdx.y]) / static_cast<acc_t>(H * W);
  const acc_t k0 = n0 > 0 ? r0 / n0 * S0 : acc_t(0), k1 = n1 > 0 ? r1 / n1 * S1 : acc_t(0);
  for (int64_t c = L::group(); c < C; c += L::kGroups) {
    const int64_t a0 = pos.off0 + c * s0.c, a1 = pos.off1 + c * s1.c;
    const acc_t x = to_acc(f0[a0]), y = to_acc(f1[a1]);
    const acc_t wu = (weight ? weight[c] : acc_t(1)) * (r0 * x - r1 * y);
    if (g0) store(g0 + a0, coef * r0 * (wu - k0 * x));
    if (g1) store(g1 + a1, -coef * r1 * (wu - k1 * y));
  }
}

Strides strides(const std::array<int64_t, 4>& s) { return {s[0], s[1], s[2], s[3]}; }

template <typename scalar_t>
const char* forward_typed(const Problem& p, const void* f0, const void* f1, const void* weight, double eps,
                          void* partial, void* out, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const dim3 block(kLanes, kRows), grid(static_cast<unsigned>(tiles_of(p)), static_cast<unsigned>(p.B));
  const auto* a = static_cast<const scalar_t*>(f0);
  const auto* b = static_cast<const scalar_t*>(f1);
  const auto* w = static_cast<const acc_t*>(weight);
  auto* part = static_cast<acc_t*>(partial);
  if (p.channel_lanes)
    forward_kernel<scalar_t, true><<<grid, block, 0, stream>>>(a, strides(p.s0), b, strides(p.s1), w, p.C, p.H, p.W,
                                                              static_cast<acc_t>(eps), part);
  else
    forward_kernel<scalar_t, false><<<grid, block, 0, stream>>>(a, strides(p.s0), b, strides(p.s1), w, p.C, p.H, p.W,
                                                               static_cast<acc_t>(eps), part);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cudaGetErrorString(err);
  finalize_kernel<scalar_t><<<static_cast<unsigned>(p.B), block, 0, stream>>>(part, tiles_of(p), p.H * p.W,
                                                                             static_cast<scalar_t*>(out));
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename scalar_t>
const char* backward_typed(const Problem& p, const void* grad, const void* f0, const void* f1, const void* weight,
                           double eps, void* g0, void* g1, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const dim3 block(kLanes, kRows), grid(static_cast<unsigned>(tiles_of(p)), static_cast<unsigned>(p.B));
  const auto* go = static_cast<const scalar_t*>(grad);
  const auto* a = static_cast<const scalar_t*>(f0);
  const auto* b = static_cast<const scalar_t*>(f1);
  const auto* w = static_cast<const acc_t*>(weight);
  auto* o0 = static_cast<scalar_t*>(g0);
  auto* o1 = static_cast<scalar_t*>(g1);
  if (p.channel_lanes)
    backward_kernel<scalar_t, true><<<grid, block, 0, stream>>>(go, a, strides(p.s0), b, strides(p.s1), w, p.C, p.H,
                                                               p.W, static_cast<acc_t>(eps), o0, o1);
  else
    backward_kernel<scalar_t, false><<<grid, block, 0, stream>>>(go, a, strides(p.s0), b, strides(p.s1), w, p.C, p.H,
                                                                p.W, static_cast<acc_t>(eps), o0, o1);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* launch_forward(DType dtype, const Problem& p, const void* f0, const void* f1, const void* weight,
                           double eps, void* partial, void* out, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat: return forward_typed<float>(p, f0, f1, weight, eps, partial, out, s);
    case DType::kHalf: return forward_typed<__half>(p, f0, f1, weight, eps, partial, out, s);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(p, f0, f1, weight, eps, partial, out, s);
    case DType::kDouble: return forward_typed<double>(p, f0, f1, weight, eps, partial, out, s);
  }
  return "unsupported dtype";
}

const char* launch_backward(DType dtype, const Problem& p, const void* grad, const void* f0, const void* f1,
                            const void* weight, double eps, void* g0, void* g1, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat: return backward_typed<float>(p, grad, f0, f1, weight, eps, g0, g1, s);
    case DType::kHalf: return backward_typed<__half>(p, grad, f0, f1, weight, eps, g0, g1, s);
    case DType::kBFloat16: return backward_typed<__nv_bfloat16>(p, grad, f0, f1, weight, eps, g0, g1, s);
    case DType::kDouble: return backward_typed<double>(p, grad, f0, f1, weight, eps, g0, g1, s);
  }
  return "unsupported dtype";
}

}  // namespace cuda
}  // namespace cmt_csrc
