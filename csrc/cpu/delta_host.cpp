// The gated delta rule's CUDA block programs on the host, registered as the CPU device's hooks (csrc/delta.h)
// and taken only under LASP_DELTA_KERNELS=host: the chain of states and the solves (delta_chain.h,
// delta_solve.h) and the per-chunk programs (delta_prep.h, delta_out.h, delta_bwd.h) run for CPU tensors the
// way tests/cpp runs them, each block's threads one after another between its barriers (blocks in parallel).
// The whole op then computes with exactly the programs the GPU runs (the chain in its SIMT form), wired as
// on the GPU (the hooks, the tensors' layouts, m^-1 handed from the forward's WY program to the backward's
// transposed solve), so that a CPU checks them against the recurrence. Not a fast path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "delta.h"
#include "delta_launch.h"

namespace lasp {
namespace {

bool on() { return delta_kernels_mode() == DeltaKernels::Host; }

// f(block, smem) for blocks 0 .. n-1, each with its own `elems` elements of "shared memory".
template <typename T, typename F>
void blocks(int64_t n, size_t elems, F f) {
  at::parallel_for(0, n, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> smem(elems);
    for (int64_t b = b0; b < b1; ++b) f(b, smem.data());
  });
}

struct HostLaunch {
  template <typename T>
  void operator()(const cuda::ChainArgs<T>& a) const {
    const int tiles = (a.W + cuda::kChainCols - 1) / cuda::kChainCols;
    blocks<T>(a.BH * tiles, cuda::chain_smem_bytes<T>(a.C, a.D) / sizeof(T), [&](int64_t b, T* sm) {
      cuda::HostExec ex{cuda::kChainThreads};
      cuda::chain_block<T>(a, b / tiles, static_cast<int>(b % tiles), sm, ex);
    });
  }
  template <typename T>
  void operator()(const cuda::SolveArgs<T>& a) const {
    const int tiles = (a.W + cuda::kSolveCols - 1) / cuda::kSolveCols;
    blocks<T>(a.chunks * tiles, cuda::solve_smem_bytes<T>(a.C) / sizeof(T), [&](int64_t b, T* sm) {
      cuda::HostExec ex{cuda::kSolveCols};
      cuda::solve_block<T>(a, b / tiles, static_cast<int>(b % tiles), sm, ex);
    });
  }
  template <typename T>
  void operator()(const cuda::PrepArgs<T>& a) const {
    per_chunk<T>(
        a, cuda::kPrepThreads, cuda::prep_tc_smem_bytes(a.C, a.D, a.E),
        [&](int64_t b, auto* sm, auto& ex) { cuda::prep_block<float, cuda::HostExec, true>(a, b, sm, ex); },
        cuda::prep_smem_bytes<T>(a.C, a.D, a.E),
        [&](int64_t b, T* sm, auto& ex) { cuda::prep_block<T>(a, b, sm, ex); });
  }
  template <typename T>
  void operator()(const cuda::OutArgs<T>& a) const {
    per_chunk<T>(
        a, cuda::kOutThreads, cuda::out_tc_smem_bytes(a.C, a.D),
        [&](int64_t b, auto* sm, auto& ex) { cuda::out_tc_block(a, b, sm, ex); }, cuda::out_smem_bytes<T>(a.C, a.D),
        [&](int64_t b, T* sm, auto& ex) { cuda::out_block<T>(a, b, sm, ex); });
  }
  template <typename T>
  void operator()(const cuda::BwdArgs<T>& a) const {
    per_chunk<T>(
        a, cuda::kBwdThreads, cuda::bwd_tc_smem_bytes(a.C, a.D, a.E),
        [&](int64_t b, auto* sm, auto& ex) { cuda::bwd_tc_block(a, b, sm, ex); },
        cuda::bwd_smem_bytes<T>(a.C, a.D, a.E), [&](int64_t b, T* sm, auto& ex) { cuda::bwd_block<T>(a, b, sm, ex); });
  }
  template <typename T>
  void operator()(const cuda::DrArgs<T>& a) const {
    per_chunk<T>(
        a, cuda::kBwdThreads, cuda::dr_tc_smem_bytes(a.C, a.D, a.E),
        [&](int64_t b, auto* sm, auto& ex) { cuda::dr_tc_block(a, b, sm, ex); }, cuda::dr_smem_bytes<T>(a.C, a.D, a.E),
        [&](int64_t b, T* sm, auto& ex) { cuda::dr_block<T>(a, b, sm, ex); });
  }
  template <typename T>
  void operator()(const cuda::ProArgs<T>& a) const {
    per_chunk<T>(
        a, cuda::kBwdThreads, cuda::pro_tc_smem_bytes(a.C, a.D),
        [&](int64_t b, auto* sm, auto& ex) { cuda::pro_tc_block(a, b, sm, ex); }, cuda::pro_smem_bytes<T>(a.C, a.D),
        [&](int64_t b, T* sm, auto& ex) { cuda::pro_block<T>(a, b, sm, ex); });
  }

 private:
  // A per-chunk program (`threads` threads per block, the program's own constant) over a's chunks: its
  // tensor-core form `tc` (tf32 products emulated) where a asks for it (float, C a multiple of 16, as the device
  // takes it), else `simt`; each with its shared memory in bytes. tc is a generic lambda, instantiated for float
  // only.
  template <typename T, typename A, typename FT, typename FS>
  static void per_chunk(const A& a, int threads, size_t tc_bytes, FT tc, size_t simt_bytes, FS simt) {
    if constexpr (std::is_same<T, float>::value) {
      if (a.tensor_cores && a.C % 16 == 0) {
        blocks<float>(a.chunks, tc_bytes / sizeof(float), [&](int64_t b, float* sm) {
          cuda::HostExec ex{threads};
          tc(b, sm, ex);
        });
        return;
      }
    }
    blocks<T>(a.chunks, simt_bytes / sizeof(T), [&](int64_t b, T* sm) {
      cuda::HostExec ex{threads};
      simt(b, sm, ex);
    });
  }
};

// The per-chunk programs assume chunks of at most 64 tokens (8 row groups of 8).
bool chunk_fits(const at::Tensor& x) { return x.dim() == 5 && x.size(3) <= 64; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_host(const ChainInputs& in, const at::Tensor& S0) {
  if (!on() || !delta_launch::acc_types(S0, {&in.Bm, &in.Cm, &in.p})) return {};
  if (S0.scalar_type() == at::kDouble) return delta_launch::run_chain_program<double>(in, S0, HostLaunch());
  return delta_launch::run_chain_program<float>(in, S0, HostLaunch());
}

at::Tensor solve_host(const at::Tensor& M, const at::Tensor& R, bool transpose) {
  if (!on() || R.numel() == 0 || !delta_launch::acc_types(R, {&M})) return {};
  if (R.scalar_type() == at::kDouble) return delta_launch::run_solve_program<double>(M, R, transpose, HostLaunch());
  return delta_launch::run_solve_program<float>(M, R, transpose, HostLaunch());
}

PrepOut prep_host(const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const at::Tensor& g,
                  const at::Tensor& pre, bool tensor_cores, bool want_minv) {
  if (!on() || !chunk_fits(k) || v.dim() != 5 || !delta_launch::acc_types(k, {&v, &beta, &g, &pre})) return {};
  if (k.scalar_type() == at::kDouble)
    return delta_launch::run_prep_program<double>(k, v, beta, g, pre, tensor_cores, want_minv, HostLaunch());
  return delta_launch::run_prep_program<float>(k, v, beta, g, pre, tensor_cores, want_minv, HostLaunch());
}

at::Tensor out_host(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
                    const at::Tensor& S, const at::Tensor& U, double scale, bool tensor_cores) {
  if (!on() || !chunk_fits(q) || U.dim() != 5 || !delta_launch::acc_types(q, {&k, &gam, &pre, &S, &U})) return {};
  if (q.scalar_type() == at::kDouble)
    return delta_launch::run_out_program<double>(q, k, gam, pre, S, U, scale, tensor_cores, HostLaunch());
  return delta_launch::run_out_program<float>(q, k, gam, pre, S, U, scale, tensor_cores, HostLaunch());
}

BwdChunkOut bwd_host(const BwdChunkIn& in) {
  if (!on() || !chunk_fits(in.q) || in.u.dim() != 5 ||
      !delta_launch::acc_types(
          in.q, {&in.k, &in.v, &in.beta, &in.pre, &in.gam, &in.kk, &in.w, &in.S, &in.dSe, &in.u, &in.dO, &in.dR}))
    return {};
  if (in.q.scalar_type() == at::kDouble) return delta_launch::run_bwd_program<double>(in, HostLaunch());
  return delta_launch::run_bwd_program<float>(in, HostLaunch());
}

at::Tensor dr_host(const at::Tensor& minv, const at::Tensor& dU, const at::Tensor& S, bool tensor_cores) {
  if (!on() || !chunk_fits(dU) || S.dim() != 5 || !delta_launch::acc_types(dU, {&minv, &S})) return {};
  if (dU.scalar_type() == at::kDouble)
    return delta_launch::run_dr_program<double>(minv, dU, S, tensor_cores, HostLaunch());
  return delta_launch::run_dr_program<float>(minv, dU, S, tensor_cores, HostLaunch());
}

ProOut pro_host(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
                const at::Tensor& dO, double scale, bool tensor_cores) {
  if (!on() || !chunk_fits(q) || dO.dim() != 5 || !delta_launch::acc_types(q, {&k, &gam, &pre, &dO})) return {};
  if (q.scalar_type() == at::kDouble)
    return delta_launch::run_pro_program<double>(q, k, gam, pre, dO, scale, tensor_cores, HostLaunch());
  return delta_launch::run_pro_program<float>(q, k, gam, pre, dO, scale, tensor_cores, HostLaunch());
}

const bool registered = register_delta_chain(c10::DeviceType::CPU, &chain_host);
const bool solve_registered = register_delta_solve(c10::DeviceType::CPU, &solve_host);
const bool prep_registered = register_delta_prep(c10::DeviceType::CPU, &prep_host);
const bool out_registered = register_delta_out(c10::DeviceType::CPU, &out_host);
const bool bwd_registered = register_delta_bwd(c10::DeviceType::CPU, &bwd_host);
const bool dr_registered = register_delta_dr(c10::DeviceType::CPU, &dr_host);
const bool pro_registered = register_delta_pro(c10::DeviceType::CPU, &pro_host);

}  // namespace
}  // namespace lasp
