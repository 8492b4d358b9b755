// CUDA part of visioncoach::patchify_normalize: one pass from decoded uint8 frames
// (e.g. DALI/NVDEC output) to the normalised patch matrix Qwen2.5-VL's vision tower
// reads, instead of float conversion + normalise + permute copies in eager torch.
// Narrow ATen headers instead of torch/extension.h: nvcc spends minutes on the full API.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../patchify.h"
#include "patchify_kernel.cuh"

namespace visioncoach {

at::Tensor patchify_normalize_cuda(const at::Tensor& frames, std::vector<double> mean,
                                   std::vector<double> std, int64_t patch, int64_t temporal,
                                   int64_t merge, at::ScalarType dtype) {
  TORCH_CHECK(frames.is_cuda(), "patchify_normalize_cuda: frames must be on a CUDA device");
  const PatchGeometry g = check_patchify_args(frames, mean, std, patch, temporal, merge);
  c10::cuda::CUDAGuard guard(frames.device());
  auto src = frames.contiguous();
  auto out = at::empty({g.rows(), g.cols()}, frames.options().dtype(dtype));
  const Affine3 a = patchify_affine(mean.data(), std.data());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t blocks = patchify_blocks(total);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "patchify_normalize_cuda", [&] {
    patchify_cuda_kernel<scalar_t><<<blocks, kPatchifyThreads, 0, stream>>>(
        src.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), g, a, total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace visioncoach

TORCH_LIBRARY_IMPL(visioncoach, CUDA, m) {
  m.impl("patchify_normalize", &visioncoach::patchify_normalize_cuda);
}
