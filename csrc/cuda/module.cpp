// Python module of the optional CUDA part; the ops register themselves on load.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("has_cuda_part") = true;
}
