// The extension module: a Python module with no Python-facing functions of its own. Importing it runs
// the TORCH_LIBRARY_IMPL registrations of the kernels linked into it.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
