// Device part of visioncoach::patchify_normalize's CUDA implementation, the one source of the
// kernel for both ways it is built: nvcc (patchify.cu -> visioncoach._C_cuda) and, where the
// install had no nvcc, NVRTC at run time through CuPy (visioncoach/ops_nvrtc.py reads this file
// unchanged). NVRTC sees no ATen and no C++ standard library, so nothing here may need them;
// the launch helpers also compile as plain C++ so tests can run them against the Python mirror.
#pragma once
#include "../patchify_layout.h"

#if defined(__CUDACC_RTC__)
// Under nvcc the 16-bit outputs are at::Half / at::BFloat16 (AT_DISPATCH in patchify.cu); both
// convert from float by round-to-nearest-even, as __half / __nv_bfloat16 do.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace visioncoach {

// The per-channel multiply-add that (x / 255 - mean) / std folds into.
struct Affine3 { float scale[3]; float shift[3]; };

constexpr int kPatchifyThreads = 256;
// The kernel loops grid-stride, so any cap is correct; this one bounds the grid size.
constexpr int64_t kPatchifyMaxBlocks = 65535LL * 8;

VC_HOST_DEVICE inline int64_t patchify_blocks(int64_t total) {
  const int64_t needed = (total + kPatchifyThreads - 1) / kPatchifyThreads;
  return needed < kPatchifyMaxBlocks ? needed : kPatchifyMaxBlocks;
}

// Rounded to float once from double, like the CPU op (ops.cpp), so both devices use equal factors.
VC_HOST_DEVICE inline Affine3 patchify_affine(const double* mean, const double* std) {
  Affine3 a;
  for (int c = 0; c < 3; ++c) {
    a.scale[c] = static_cast<float>(1.0 / (255.0 * std[c]));
    a.shift[c] = static_cast<float>(-mean[c] / std[c]);
  }
  return a;
}

#if defined(__CUDACC__)
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
#endif

}  // namespace visioncoach
