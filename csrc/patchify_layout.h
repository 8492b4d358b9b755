// Pixel layout of visioncoach::patchify_normalize, shared by the CPU op (ops.cpp), the nvcc-built
// CUDA kernel (cuda/patchify.cu) and the same kernel compiled at run time by NVRTC
// (visioncoach/ops_nvrtc.py) where the install had no nvcc. NVRTC has no C++ standard library
// and no ATen, so this header includes neither: keep it that way.
#pragma once

#if defined(__CUDACC_RTC__)
namespace visioncoach {
using int64_t = long long;  // 8 bytes, as the host's int64_t the launcher packs
using uint8_t = unsigned char;
}  // namespace visioncoach
#else
#include <cstdint>
#endif

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

}  // namespace visioncoach
