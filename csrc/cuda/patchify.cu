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

namespace visioncoach {

struct Affine3 { float scale[3]; float shift[3]; };

template <typename out_t>
__global__ void patchify_cuda_kernel(const uint8_t* __restrict__ src, out_t* __restrict__ dst,
                                     PatchGeometry g, Affine3 a, int64_t total) {
  const int64_t cols = g.cols();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t c;
    const int64_t off = source_offset(g, i / cols, i % cols, &c);
    dst[i] = static_cast<out_t>(static_cast<float>(src[off]) * a.scale[c] + a.shift[c]);
  }
}

at::Tensor patchify_normalize_cuda(const at::Tensor& frames, std::vector<double> mean,
                                   std::vector<double> std, int64_t patch, int64_t temporal,
                                   int64_t merge, at::ScalarType dtype) {
  TORCH_CHECK(frames.is_cuda(), "patchify_normalize_cuda: frames must be on a CUDA device");
  const PatchGeometry g = check_patchify_args(frames, mean, std, patch, temporal, merge);
  c10::cuda::CUDAGuard guard(frames.device());
  auto src = frames.contiguous();
  auto out = at::empty({g.rows(), g.cols()}, frames.options().dtype(dtype));
  Affine3 a;
  for (int c = 0; c < 3; ++c) {
    a.scale[c] = static_cast<float>(1.0 / (255.0 * std[c]));
    a.shift[c] = static_cast<float>(-mean[c] / std[c]);
  }
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "patchify_normalize_cuda", [&] {
    patchify_cuda_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        src.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), g, a, total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace visioncoach

TORCH_LIBRARY_IMPL(visioncoach, CUDA, m) {
  m.impl("patchify_normalize", &visioncoach::patchify_normalize_cuda);
}
