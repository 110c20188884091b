// The Python module bnext._simt: importing it registers torch.ops.bnext_simt.* (the emulated CUDA
// kernels) and exposes the emulator's launch log and block order to the tests.
#include <Python.h>

#include "simt.h"

namespace {

PyObject* dims(const dim3& d) {
  return Py_BuildValue("(III)", d.x, d.y, d.z);
}

PyObject* launches(PyObject* /*self*/, PyObject* /*args*/) {
  const auto log = bnext::simt::launches();
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(log.size()));
  if (out == nullptr) {
    return nullptr;
  }
  for (size_t i = 0; i < log.size(); ++i) {
    const auto& r = log[i];
    PyObject* grid = dims(r.grid);
    PyObject* block = dims(r.block);
    PyObject* item = Py_BuildValue(
        "{s:s,s:s,s:N,s:N,s:n}", "name", r.name.c_str(), "signature", r.signature.c_str(), "grid", grid, "block",
        block, "shared_bytes", static_cast<Py_ssize_t>(r.shared_bytes));
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
}

PyObject* reset_launches(PyObject* /*self*/, PyObject* /*args*/) {
  bnext::simt::reset_launches();
  Py_RETURN_NONE;
}

PyObject* set_block_order(PyObject* /*self*/, PyObject* arg) {
  const int reverse = PyObject_IsTrue(arg);
  if (reverse < 0) {
    return nullptr;
  }
  bnext::simt::set_block_order(reverse != 0);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"launches", launches, METH_NOARGS,
     "Every emulated kernel launch so far: dicts of name, signature, grid, block, shared_bytes."},
    {"reset_launches", reset_launches, METH_NOARGS, "Clear the launch log."},
    {"set_block_order", set_block_order, METH_O,
     "Run the blocks of each launch in reverse order (True) or in order (False)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_simt", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__simt(void) {
  return PyModule_Create(&module_def);
}
