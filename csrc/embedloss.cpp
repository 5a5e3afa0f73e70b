// The Python module embedloss_kernels._C. Importing it loads the library, which runs the CPU kernels' registrations
// (TORCH_LIBRARY_IMPL(embedloss_cpp, CPU) at the end of each csrc/cpu/<loss>_cpu.cpp). The schemas, the fake
// implementations and the one autograd rule are registered from Python (embedloss_kernels/ops), the same for every
// backend.
//
// Its one function, graph_task_keeps_graph(), tells that autograd rule (embedloss_kernels/ops/autograd.py) whether
// the backward running on this thread keeps the graph (retain_graph / create_graph): only when it does not may the
// saved gradients be scaled in place and handed on, since the engine releases them as soon as the node has run.
#include <Python.h>

#include <torch/csrc/autograd/graph_task.h>

static PyObject* graph_task_keeps_graph(PyObject*, PyObject*) {
  if (torch::autograd::get_current_graph_task_id() == -1) Py_RETURN_TRUE;  // not inside a backward: assume it does
  if (torch::autograd::get_current_graph_task_keep_graph()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

static PyMethodDef embedloss_methods[] = {
    {"graph_task_keeps_graph", graph_task_keeps_graph, METH_NOARGS,
     "Whether the autograd graph task running on this thread keeps its graph (True outside any backward)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef embedloss_module = {PyModuleDef_HEAD_INIT, "_C", "embedloss_cpp CPU kernels", -1,
                                              embedloss_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&embedloss_module); }
