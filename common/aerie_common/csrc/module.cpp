// The project's C++ CPU kernels as one Python module (cpu_extension.py builds it).
#include <torch/extension.h>

void define_packed_linear(pybind11::module& module);
void define_rotary(pybind11::module& module);
void define_lean_layers(pybind11::module& module);
void define_eagle_draft(pybind11::module& module);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  define_packed_linear(module);
  define_rotary(module);
  define_lean_layers(module);
  define_eagle_draft(module);
}
