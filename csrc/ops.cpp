// Native ops of VisionCoach (CPU part, always built). The CUDA kernels register
// against the same schemas from csrc/cuda/ when that optional part builds.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "patchify.h"

namespace visioncoach {

// Output row (t, h/ms, w/ms, ms_h, ms_w) is one ps x ps patch of tp consecutive frames, columns
// (c, tt, py, px). Work goes by patch row (t, h): each source line it covers is normalised once
// into a channel-planar float line (a long, vectorisable loop; (x / 255 - mean) / std folded
// into one multiply-add), then copied out in runs of ps values to the gw patches' rows. Per
// element index arithmetic (source_offset) or per-patch loops of only ps iterations made this
// op several times slower than writing its output.
template <typename out_t>
void patchify_cpu_kernel(const uint8_t* src, out_t* dst, const PatchGeometry& g, const float* scale,
                         const float* shift) {
  const int64_t cols = g.cols(), ps = g.patch, tp = g.temporal, ms = g.merge;
  const int64_t gh = g.grid_h(), gw = g.grid_w(), width = g.width, blocks_w = gw / ms;
  const int64_t plane = tp * ps * ps;              // columns per channel
  const int64_t frame_bytes = g.height * width * 3, line_bytes = width * 3;
  at::parallel_for(0, (g.frames / tp) * gh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> line(3 * width);            // [3, W] one normalised source line
    float* l0 = line.data();
    float* l1 = l0 + width;
    float* l2 = l1 + width;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t t = unit / gh, h = unit % gh;
      const int64_t row_base = t * gh * gw + (h / ms) * blocks_w * ms * ms + (h % ms) * ms;
      for (int64_t tt = 0; tt < tp; ++tt) {
        for (int64_t y = 0; y < ps; ++y) {
          const uint8_t* px = src + (t * tp + tt) * frame_bytes + (h * ps + y) * line_bytes;
          for (int64_t x = 0; x < width; ++x) {
            l0[x] = static_cast<float>(px[3 * x]) * scale[0] + shift[0];
            l1[x] = static_cast<float>(px[3 * x + 1]) * scale[1] + shift[1];
            l2[x] = static_cast<float>(px[3 * x + 2]) * scale[2] + shift[2];
          }
          for (int64_t w = 0; w < gw; ++w) {
            const int64_t row = row_base + (w / ms) * ms * ms + w % ms;
            out_t* o = dst + row * cols + tt * ps * ps + y * ps;
            const int64_t x0 = w * ps;
            for (int64_t x = 0; x < ps; ++x) o[x] = static_cast<out_t>(l0[x0 + x]);
            for (int64_t x = 0; x < ps; ++x) o[plane + x] = static_cast<out_t>(l1[x0 + x]);
            for (int64_t x = 0; x < ps; ++x) o[2 * plane + x] = static_cast<out_t>(l2[x0 + x]);
          }
        }
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

namespace visioncoach {
void register_gt_pack(pybind11::module& m);  // gt_pack.cpp
}  // namespace visioncoach

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("has_cuda_part") = false;
  visioncoach::register_gt_pack(m);
}
