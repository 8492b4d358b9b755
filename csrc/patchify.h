// Qwen2.5-VL pixel layout shared by the CPU and CUDA implementations of
// visioncoach::patchify_normalize.
#pragma once
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#if defined(__CUDACC__)
#define VC_HOST_DEVICE __host__ __device__
#else
#define VC_HOST_DEVICE
#endif

namespace visioncoach {

// Geometry of one call: frames [F, H, W, 3] uint8 -> patches [F/tp * H/ps * W/ps, 3*tp*ps*ps].
struct PatchGeometry {
  int64_t frames, height, width;  // F, H, W
  int64_t patch, temporal, merge; // ps, tp, ms
  VC_HOST_DEVICE int64_t grid_h() const { return height / patch; }
  VC_HOST_DEVICE int64_t grid_w() const { return width / patch; }
  VC_HOST_DEVICE int64_t rows() const { return (frames / temporal) * grid_h() * grid_w(); }
  VC_HOST_DEVICE int64_t cols() const { return 3 * temporal * patch * patch; }
};

// Source pixel offset (into the uint8 HWC buffer) of output element (row, col).
// Rows follow transformers' Qwen2-VL processor order (t, h/ms, w/ms, ms_h, ms_w) so that
// every 2x2 block of patches the vision merger fuses is contiguous; columns are (c, tt, py, px).
VC_HOST_DEVICE inline int64_t source_offset(const PatchGeometry& g, int64_t row, int64_t col, int64_t* channel) {
  const int64_t gh = g.grid_h(), gw = g.grid_w(), ms = g.merge, ps = g.patch;
  const int64_t per_t = gh * gw;
  const int64_t t = row / per_t;
  int64_t r = row % per_t;
  const int64_t blocks_w = gw / ms;
  const int64_t block = r / (ms * ms);
  const int64_t in_block = r % (ms * ms);
  const int64_t h = (block / blocks_w) * ms + in_block / ms;
  const int64_t w = (block % blocks_w) * ms + in_block % ms;
  const int64_t c = col / (g.temporal * ps * ps);
  int64_t k = col % (g.temporal * ps * ps);
  const int64_t tt = k / (ps * ps);
  k %= ps * ps;
  const int64_t y = h * ps + k / ps, x = w * ps + k % ps;
  const int64_t f = t * g.temporal + tt;
  *channel = c;
  return ((f * g.height + y) * g.width + x) * 3 + c;
}

// Argument checks shared by both devices (inline: the two parts are separate modules).
inline PatchGeometry check_patchify_args(const at::Tensor& frames, const std::vector<double>& mean,
                                  const std::vector<double>& std, int64_t patch, int64_t temporal,
                                  int64_t merge) {
  TORCH_CHECK(frames.dim() == 4 && frames.size(3) == 3,
              "patchify_normalize: frames must be [F, H, W, 3] RGB, got ", frames.sizes());
  TORCH_CHECK(frames.scalar_type() == at::kByte, "patchify_normalize: frames must be uint8, got ",
              frames.scalar_type());
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "patchify_normalize: mean and std need 3 values");
  for (double s : std) TORCH_CHECK(s > 0, "patchify_normalize: std must be positive");
  TORCH_CHECK(patch > 0 && temporal > 0 && merge > 0, "patchify_normalize: sizes must be positive");
  PatchGeometry g{frames.size(0), frames.size(1), frames.size(2), patch, temporal, merge};
  TORCH_CHECK(g.frames % temporal == 0, "patchify_normalize: frame count ", g.frames,
              " is not a multiple of temporal_patch_size ", temporal,
              " (repeat the last frame, as the Qwen2.5-VL processor does)");
  TORCH_CHECK(g.height % (patch * merge) == 0 && g.width % (patch * merge) == 0,
              "patchify_normalize: frame size ", g.height, "x", g.width, " is not a multiple of ",
              patch * merge, " (resize to multiples of patch_size * merge_size first)");
  return g;
}

}  // namespace visioncoach
