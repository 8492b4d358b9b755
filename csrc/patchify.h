// Argument checks of visioncoach::patchify_normalize shared by its CPU and CUDA parts (ATen:
// host only); the pixel layout itself is in patchify_layout.h.
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "patchify_layout.h"  // PatchGeometry, source_offset (also compiled by NVRTC)

namespace visioncoach {

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
