// The Python module convs2s._C and the one place where the native ops are registered with the dispatcher.
// Importing the module loads this shared library, whose static initializers below (TORCH_LIBRARY,
// TORCH_LIBRARY_IMPL) define the op schemas and bind their CPU and CUDA implementations; from Python they are
// called as torch.ops.convs2s.<name>. The module itself exports one function, has_cuda(), and needs no pybind11
// (whose headers would add half a minute of compile time here).
//
// Each op's implementation lives in csrc/<op>.cpp; its signature is declared here, next to its schema.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace convs2s {

// glu_conv.cpp
std::tuple<at::Tensor, at::Tensor> glu_conv_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& residual, bool causal);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> glu_conv_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& h, bool has_residual, bool causal, std::array<bool, 4> output_mask);

// conv_attention.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_attention_fwd(
    const at::Tensor& x, const at::Tensor& te, const at::Tensor& keys, const at::Tensor& values,
    const std::optional<at::Tensor>& src_padding_mask, const at::Tensor& w_in, const at::Tensor& b_in,
    const at::Tensor& w_out, const at::Tensor& b_out, bool need_weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_attention_bwd(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attn, const at::Tensor& x,
                   const at::Tensor& keys, const at::Tensor& values,
                   const std::optional<at::Tensor>& src_padding_mask, const at::Tensor& w_in,
                   const at::Tensor& w_out, const at::Tensor& q, const at::Tensor& ctx, const at::Tensor& lse);

// glu_conv_step.cpp
at::Tensor glu_conv_step_native(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual);

}  // namespace convs2s

TORCH_LIBRARY(convs2s, m) {
  m.def("glu_conv_native_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool causal) "
        "-> (Tensor y, Tensor h)");
  m.def("glu_conv_native_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor h, bool has_residual, "
        "bool causal, bool[4] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "
        "Tensor grad_residual)");
  m.def("conv_attention_native_fwd(Tensor x, Tensor target_embedding, Tensor encoder_keys, Tensor encoder_values, "
        "Tensor? src_padding_mask, Tensor w_in, Tensor b_in, Tensor w_out, Tensor b_out, bool need_weights) -> "
        "(Tensor out, Tensor attn, Tensor q, Tensor ctx, Tensor lse)");
  m.def("conv_attention_native_bwd(Tensor grad_out, Tensor? grad_attn, Tensor x, Tensor encoder_keys, "
        "Tensor encoder_values, Tensor? src_padding_mask, Tensor w_in, Tensor w_out, Tensor q, Tensor ctx, "
        "Tensor lse) -> (Tensor grad_x, Tensor grad_target_embedding, Tensor grad_keys, Tensor grad_values, "
        "Tensor grad_w_in, Tensor grad_b_in, Tensor grad_w_out, Tensor grad_b_out)");
  m.def("glu_conv_step_native(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, Tensor? residual) "
        "-> Tensor");
}

// The same functions serve both devices: each dispatches its kernels on the tensors' device itself.
#define CONVS2S_IMPLS(m)                                                    \
  m.impl("glu_conv_native_fwd", &convs2s::glu_conv_fwd);                    \
  m.impl("glu_conv_native_bwd", &convs2s::glu_conv_bwd);                    \
  m.impl("conv_attention_native_fwd", &convs2s::conv_attention_fwd);        \
  m.impl("conv_attention_native_bwd", &convs2s::conv_attention_bwd);        \
  m.impl("glu_conv_step_native", &convs2s::glu_conv_step_native)

TORCH_LIBRARY_IMPL(convs2s, CPU, m) { CONVS2S_IMPLS(m); }

#ifdef CONVS2S_WITH_CUDA
TORCH_LIBRARY_IMPL(convs2s, CUDA, m) { CONVS2S_IMPLS(m); }
#endif

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
