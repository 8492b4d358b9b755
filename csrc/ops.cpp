// Native ops of VisionCoach (CPU part, always built). The CUDA kernels register
// against the same schemas from csrc/cuda/ when that optional part builds.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "patchify.h"

namespace visioncoach {

template <typename out_t>
void patchify_cpu_kernel(const uint8_t* src, out_t* dst, const PatchGeometry& g, const float* scale,
                         const float* shift) {
  const int64_t cols = g.cols();
  at::parallel_for(0, g.rows(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t col = 0; col < cols; ++col) {
        int64_t c;
        const int64_t off = source_offset(g, row, col, &c);
        // (x / 255 - mean) / std folded into one multiply-add per pixel.
        dst[row * cols + col] = static_cast<out_t>(static_cast<float>(src[off]) * scale[c] + shift[c]);
      }
    }
  });
}

at::Tensor patchify_normalize_cpu(const at::Tensor& frames, std::vector<double> mean,
                                  std::vector<double> std, int64_t patch, int64_t temporal,
                                  int64_t merge, at::ScalarType dtype) {
  TORCH_CHECK(frames.device().is_cpu(), "patchify_normalize_cpu: frames must be on the CPU");
  const PatchGeometry g = check_patchify_args(frames, mean, std, patch, temporal, merge);
  auto src = frames.contiguous();
  auto out = at::empty({g.rows(), g.cols()}, frames.options().dtype(dtype));
  float scale[3], shift[3];
  for (int c = 0; c < 3; ++c) {
    scale[c] = static_cast<float>(1.0 / (255.0 * std[c]));
    shift[c] = static_cast<float>(-mean[c] / std[c]);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "patchify_normalize_cpu", [&] {
    patchify_cpu_kernel<scalar_t>(src.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), g, scale, shift);
  });
  return out;
}

}  // namespace visioncoach

TORCH_LIBRARY(visioncoach, m) {
  m.def(
      "patchify_normalize(Tensor frames, float[] mean, float[] std, int patch_size, "
      "int temporal_patch_size, int merge_size, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(visioncoach, CPU, m) {
  m.impl("patchify_normalize", &visioncoach::patchify_normalize_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("has_cuda_part") = false;
}
