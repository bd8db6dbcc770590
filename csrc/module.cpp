// The Python module convs2s._C. Importing it loads this shared library, whose static initializers register the
// ops (TORCH_LIBRARY in glu_conv.cpp, fragments elsewhere) with the dispatcher; from Python they are called as
// torch.ops.convs2s.<name>. The module itself exports one function, has_cuda(), and needs no pybind11 (whose
// headers would add half a minute of compile time here).
#include <Python.h>

namespace {

PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef CONVS2S_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "True iff the extension was built with its CUDA kernels."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "convs2s native ops (C++ CPU and CUDA kernels)", -1,
                          methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
