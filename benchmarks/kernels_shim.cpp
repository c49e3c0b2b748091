// A torch-free C shim over the lasp CUDA kernels (kernels/lasp_cuda.h), so that benchmarks/bench_kernels.py
// can time the raw kernels through ctypes even where the Python package is not built.
// Build: nvcc -std=c++17 -O3 -shared -Xcompiler -fPIC -Ikernels --expt-relaxed-constexpr --use_fast_math \
//          -gencode=arch=compute_90a,code=sm_90a kernels/*.cu benchmarks/kernels_shim.cpp -o liblasp_shim.so
#include <cstdint>

#include "lasp_cuda.h"

namespace {
lasp::AttnParams make(const int64_t* dims, double scale, void* const* ptrs, const int64_t* strides) {
  lasp::AttnParams p;
  p.dtype = static_cast<lasp::ScalarType>(dims[0]);
  p.B = dims[1];
  p.H = dims[2];
  p.Hkv = dims[3];
  p.N = dims[4];
  p.D = dims[5];
  p.E = dims[6];
  p.scale = scale;
  p.decay = ptrs[0];
  lasp::TensorView4* views[8] = {&p.q, &p.k, &p.v, &p.o, &p.dout, &p.dq, &p.dk, &p.dv};
  for (int i = 0; i < 8; ++i) {
    views[i]->ptr = ptrs[1 + i];
    for (int j = 0; j < 4; ++j) views[i]->stride[j] = strides[4 * i + j];
  }
  p.state_in = ptrs[9];
  p.state_out = ptrs[10];
  p.grad_state_out = ptrs[11];
  p.grad_state_in = ptrs[12];
  p.workspace = ptrs[13];
  return p;
}
}  // namespace

extern "C" {
// which: 0 fwd, 1 bwd. dims: dtype, B, H, Hkv, N, D, E.
size_t lasp_shim_workspace(int which, const int64_t* dims) {
  int64_t strides[32] = {0};
  void* ptrs[14] = {nullptr};
  lasp::AttnParams p = make(dims, 1.0, ptrs, strides);
  return which == 0 ? lasp::cuda::fwd_workspace_bytes(p) : lasp::cuda::bwd_workspace_bytes(p);
}
int lasp_shim_supports(const int64_t* dims) {
  int64_t strides[32] = {0};
  void* ptrs[14] = {nullptr};
  return lasp::cuda::supports(make(dims, 1.0, ptrs, strides)) ? 1 : 0;
}
// ptrs: decay, q, k, v, o, dout, dq, dk, dv, state_in, state_out, grad_state_out, grad_state_in, workspace.
// strides: 4 per tensor for q, k, v, o, dout, dq, dk, dv. which: 0 fwd, 1 bwd, 2 fwd_local, 3 bwd_local.
int lasp_shim_call(int which, const int64_t* dims, double scale, void* const* ptrs, const int64_t* strides,
                   size_t ws_bytes, void* stream) {
  lasp::AttnParams p = make(dims, scale, ptrs, strides);
  p.workspace_bytes = ws_bytes;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (which) {
    case 0: return (int)lasp::cuda::fwd(p, s);
    case 1: return (int)lasp::cuda::bwd(p, s);
    case 2: return (int)lasp::cuda::fwd_local(p, s);
    case 3: return (int)lasp::cuda::bwd_local(p, s);
  }
  return -1;
}
}
