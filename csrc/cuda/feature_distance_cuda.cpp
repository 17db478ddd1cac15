// CUDA implementations of the cmt_csrc::feature_distance ops (this file + the .cu = the kernels._cuda
// extension). Host side only: checks (shared with the CPU path), allocation, stream and device guard; the
// kernels are in feature_distance_kernel.cu. The op schemas are defined by kernels._C, which Python imports
// first. Importing this library needs no GPU (registration only); calling it does.
#include <Python.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../feature_distance.h"
#include "feature_distance_kernel.h"

namespace cmt_csrc {
namespace {

cuda::DType kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return cuda::DType::kFloat;
    case c10::kHalf: return cuda::DType::kHalf;
    case c10::kBFloat16: return cuda::DType::kBFloat16;
    default: return cuda::DType::kDouble;  // prepare() admits no other dtype
  }
}

cuda::Problem problem_of(const Inputs& in) {
  TORCH_CHECK(in.B <= 65535, "cmt_csrc::feature_distance (cuda): at most 65535 samples per call, got ", in.B);
  // Lanes follow the fastest of f0's channel and width strides (coalesced loads).
  return {in.B, in.C, in.H, in.W, strides_of(in.f0), strides_of(in.f1), in.f0.stride(1) < in.f0.stride(3)};
}

const void* weight_ptr(const Inputs& in) { return in.weight.defined() ? in.weight.const_data_ptr() : nullptr; }

at::Tensor forward_cuda(const at::Tensor& f0, const at::Tensor& f1, const std::optional<at::Tensor>& weight,
                        double eps) {
  const Inputs in = prepare(f0, f1, weight, c10::DeviceType::CUDA, "cuda");
  const c10::cuda::CUDAGuard guard(f0.device());
  at::Tensor out = at::empty({in.B}, f0.options());
  if (in.B == 0) return out;
  const cuda::Problem p = problem_of(in);
  at::Tensor partial = at::empty({in.B * cuda::tiles_of(p)}, f0.options().dtype(accumulate_dtype(f0.scalar_type())));
  const char* err = cuda::launch_forward(kernel_dtype(f0.scalar_type()), p, in.f0.const_data_ptr(),
                                         in.f1.const_data_ptr(), weight_ptr(in), eps, partial.mutable_data_ptr(),
                                         out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "cmt_csrc::feature_distance (cuda): kernel launch failed: ", err);
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& f0, const at::Tensor& f1,
                                                 const std::optional<at::Tensor>& weight, double eps, bool need_f0,
                                                 bool need_f1) {
  const Inputs in = prepare(f0, f1, weight, c10::DeviceType::CUDA, "cuda");
  TORCH_CHECK(grad.numel() == in.B, "cmt_csrc::feature_distance_backward: grad has ", grad.numel(),
              " values for ", in.B, " samples");
  const c10::cuda::CUDAGuard guard(f0.device());
  at::Tensor g0 = need_f0 ? at::empty_like(in.f0) : at::Tensor();  // same strides as the (dense) input
  at::Tensor g1 = need_f1 ? at::empty_like(in.f1) : at::Tensor();
  if (in.B == 0 || !(need_f0 || need_f1)) return {g0, g1};
  const at::Tensor go = grad.to(f0.device(), f0.scalar_type()).contiguous();
  const char* err = cuda::launch_backward(kernel_dtype(f0.scalar_type()), problem_of(in), go.const_data_ptr(),
                                          in.f0.const_data_ptr(), in.f1.const_data_ptr(), weight_ptr(in), eps,
                                          need_f0 ? g0.mutable_data_ptr() : nullptr,
                                          need_f1 ? g1.mutable_data_ptr() : nullptr,
                                          c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "cmt_csrc::feature_distance_backward (cuda): kernel launch failed: ", err);
  return {g0, g1};
}

}  // namespace

TORCH_LIBRARY_IMPL(cmt_csrc, CUDA, m) {
  m.impl("feature_distance", &forward_cuda);
  m.impl("feature_distance_backward", &backward_cuda);
}

}  // namespace cmt_csrc

// `import kernels._cuda` loads this library, which runs the registration above; the module itself is empty.
extern "C" PyObject* PyInit__cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
