// The Python module bnext._C: importing it loads this library, whose static initializers register
// the bnext ops (csrc/ops.cpp and the TORCH_LIBRARY_IMPL blocks). It also answers build_info().
#include <Python.h>
#include <torch/version.h>

#include <string>

#include "cpu/isa.h"

#ifndef BNEXT_CUDA_ARCHS
#define BNEXT_CUDA_ARCHS ""
#endif

namespace {

PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef BNEXT_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
  return Py_BuildValue(
      "{s:s,s:O,s:s,s:s}",
      "torch_version", TORCH_VERSION,
      "cuda", cuda,
      "cuda_archs", BNEXT_CUDA_ARCHS,
      "cpu_isa", bnext::cpu::active_isa());
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was built (see bnext.build_info)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&module_def);
}
