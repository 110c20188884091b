// The Python module bnext._C: importing it loads this library, whose static initializers register
// the bnext ops (csrc/ops.cpp and the TORCH_LIBRARY_IMPL blocks). It also answers build_info().
#include <Python.h>
#include <torch/version.h>

#include <string>

#include "cpu/isa.h"
#include "cpu/kernels.h"

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

// Tests: whether the CPU kernels really run on torch's intra-op threads (see KernelTable).
PyObject* parallel_probe(PyObject* /*self*/, PyObject* arg) {
  const long long tasks = PyLong_AsLongLong(arg);
  if (tasks == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  if (tasks < 1) {
    PyErr_Format(PyExc_ValueError, "bnext._C._parallel_probe: tasks must be >= 1, got %lld", tasks);
    return nullptr;
  }
  try {
    return PyLong_FromLong(bnext::cpu::kernels().parallel_probe(tasks));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was built (see bnext.build_info)."},
    {"_parallel_probe", parallel_probe, METH_O, "Threads at::parallel_for used for N tasks in the CPU kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&module_def);
}
