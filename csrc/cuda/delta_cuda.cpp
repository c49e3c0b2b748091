// CUDA kernels for the gated delta rule's chain of states and its chunks' unit-triangular solves
// (kernels/delta_kernels.cu), registered as the CUDA device's (csrc/delta.h).
// LASP_DELTA_KERNELS selects them per call: "cuda" (the default) runs them, "aten" the ATen compositions.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <cstring>

#include "delta.h"
#include "delta_chain_api.h"

namespace lasp {
namespace {

bool use_kernel() {
  const char* v = std::getenv("LASP_DELTA_KERNELS");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "cuda") == 0) return true;
  TORCH_CHECK_VALUE(std::strcmp(v, "aten") == 0, "LASP_DELTA_KERNELS must be 'aten' or 'cuda', got '", v, "'");
  return false;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const ChainInputs& in, const at::Tensor& S0) {
  const int64_t B = S0.size(0), H = S0.size(1), D = S0.size(2), W = S0.size(3);
  const int64_t nc = in.Bm.size(2), C = in.Bm.size(3);
  const auto o = S0.options();
  auto c = [](const at::Tensor& t) { return t.defined() ? t.contiguous() : t; };
  const at::Tensor A = c(in.A), Bm = c(in.Bm), Cm = c(in.Cm), R = c(in.R), S = c(S0);
  const at::Tensor p = in.p.reshape({B, H, nc}).contiguous();
  at::Tensor store = at::empty({B, H, nc, D, W}, o), X = at::empty({B, H, nc, C, W}, o), fin = at::empty({B, H, D, W}, o);
  cuda::ChainArgs<T> a;
  a.BH = B * H;
  a.nc = nc;
  a.C = static_cast<int>(C);
  a.D = static_cast<int>(D);
  a.W = static_cast<int>(W);
  a.A = A.defined() ? A.data_ptr<T>() : nullptr;
  a.Bm = Bm.data_ptr<T>();
  a.Cm = Cm.data_ptr<T>();
  a.p = p.data_ptr<T>();
  a.R = R.defined() ? R.data_ptr<T>() : nullptr;
  a.S0 = S.data_ptr<T>();
  a.Sstore = store.data_ptr<T>();
  a.X = X.data_ptr<T>();
  a.Sfin = fin.data_ptr<T>();
  a.bsign = static_cast<T>(in.bsign);
  a.csign = static_cast<T>(in.csign);
  a.reverse = in.reverse;
  if (a.BH > 0) C10_CUDA_CHECK(cuda::delta_chain(a, at::cuda::getCurrentCUDAStream()));
  return {store, X, fin};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_cuda(const ChainInputs& in, const at::Tensor& S0) {
  if (!use_kernel()) return {};
  const c10::cuda::CUDAGuard guard(S0.device());
  if (S0.scalar_type() == at::kDouble) return run<double>(in, S0);
  if (S0.scalar_type() == at::kFloat) return run<float>(in, S0);
  return {};
}

template <typename T>
at::Tensor solve(const at::Tensor& M, const at::Tensor& R, bool transpose) {
  const at::Tensor Mc = M.contiguous(), Rc = R.contiguous();
  at::Tensor X = at::empty_like(Rc);
  cuda::SolveArgs<T> a;
  a.chunks = Rc.numel() / (Rc.size(-1) * Rc.size(-2));
  a.C = static_cast<int>(Rc.size(-2));
  a.W = static_cast<int>(Rc.size(-1));
  a.M = Mc.data_ptr<T>();
  a.R = Rc.data_ptr<T>();
  a.X = X.data_ptr<T>();
  a.transpose = transpose;
  if (a.chunks > 0) C10_CUDA_CHECK(cuda::delta_solve(a, at::cuda::getCurrentCUDAStream()));
  return X;
}

at::Tensor solve_cuda(const at::Tensor& M, const at::Tensor& R, bool transpose) {
  if (!use_kernel() || R.numel() == 0 || M.scalar_type() != R.scalar_type()) return {};
  const c10::cuda::CUDAGuard guard(R.device());
  if (R.scalar_type() == at::kDouble) return solve<double>(M, R, transpose);
  if (R.scalar_type() == at::kFloat) return solve<float>(M, R, transpose);
  return {};
}

const bool registered = register_delta_chain(c10::DeviceType::CUDA, &chain_cuda);
const bool solve_registered = register_delta_solve(c10::DeviceType::CUDA, &solve_cuda);

}  // namespace
}  // namespace lasp
