// The gated delta rule's per-chunk gradients in 16 bits (delta_grad16.cu), the third of the backward's kernels
// that kernels/DESIGN.md plans for sm_80+ / sm_90a, after the two chains (delta_chain16.h). Per chunk of C = 64
// tokens, from q, k, v, dO, the forward chain's U and Sb (the state entering the chunk), the reverse chain's dU and
// dSe (the gradient of the state leaving it), the log gates g and beta; with pre, suf, Gam as in delta_chain16.h,
// m = I + A, A = diag(beta) (Gam * K K^T) strictly lower, Minv = m^-1:
//   dP  = scale (dO U^T) * Gam;                dq = scale diag(pre) dO Sb^T + dP K
//   dRk = Minv^T (-dU Sb^T);   dRv = Minv^T dU;   dv = diag(beta) dRv
//   dA  = -(X Minv^T) strictly lower,   X = (dRv V^T) diag(beta) + (dRk K^T) diag(beta pre)
//   dkk = diag(beta) dA * Gam
//   dk  = (dkk + dkk^T) K + dP^T Q + diag(suf) U dSe^T + diag(beta pre) dRk
//   dbeta = rowsum(dRv * V) + pre rowsum(dRk * K) + rowsum(dA * Gam * K K^T)
//   dg  from XG = dP * (Q K^T) + diag(beta) dA * Gam * K K^T, Xp = pre (scale rowsum(Q * dO Sb^T) + beta
//       rowsum(dRk * K), + sum(dSe * Sb) at the last row), Xs = suf rowsum(K * U dSe^T):
//       dg[t] = sum_{i >= t} Xp[i] + sum_{j < t} sum_{i >= t} XG[i, j] + sum_{j < t} Xs[j]
// (delta_bwd.h's formulas with W = Minv [diag(beta) V | diag(beta pre) K] folded into X). Torch-free.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace lasp {
namespace cuda {

// q (B, Hq, N, D), k (B, Hk, N, D), v (B, Hv, N, E) as the op got them (strides of b, head, n; the last dim
// contiguous), read through the head maps (output head h reads q head h / qgroup, k head h / kgroup, v head
// h / vgroup); dO (B, H, N, E) (strides of b, h, n); U and dU (B, H, N, E), Sb and dSe (B, H, nc, D, E), contiguous
// in q's dtype (the chains' outputs); g and beta (B, H, N) fp32 contiguous. Writes dq, dk (B, H, N, D), dv
// (B, H, N, E) per output head with the strides of b, h, n in dqs, dks, dvs (the last dim contiguous), fp32, or in
// q's dtype where out16 has their bit (1, 2, 4); dbeta and dg (B, H, N) fp32 contiguous.
struct Grad16Args {
  int64_t B = 0, H = 0, N = 0;
  int D = 0, E = 0;
  int qgroup = 1, kgroup = 1, vgroup = 1;
  bool bf16 = true;  // else fp16
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* dout = nullptr;
  int64_t qs[3] = {0, 0, 0}, ks[3] = {0, 0, 0}, vs[3] = {0, 0, 0}, ds[3] = {0, 0, 0};
  const void* u = nullptr;
  const void* du = nullptr;
  const void* sb = nullptr;
  const void* dse = nullptr;
  const float* g = nullptr;
  const float* beta = nullptr;
  float scale = 1.f;
  int out16 = 0;
  int64_t dqs[3] = {0, 0, 0}, dks[3] = {0, 0, 0}, dvs[3] = {0, 0, 0};
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dbeta = nullptr;
  float* dg = nullptr;
  // Optional: m^-1 in q's dtype as the WY kernel writes it (Wy16Args::minv: (B, H, N, C) contiguous, 16-byte
  // aligned), read instead of formed (no K K^T for m, no inversion).
  const void* minv = nullptr;
};

// D and E in {64, 128}, rows of q, k, v, dO, dq, dk, dv on 16-byte boundaries, U, dU, Sb, dSe and minv on
// 16-byte boundaries, N >= 0.
bool delta_grad16_takes(const Grad16Args& args);
// One block of 256 threads per chunk ((b, h)-major); sm_80 or later; up to 223 KiB of shared memory (D = E = 128).
// cudaErrorInvalidValue where delta_grad16_takes is false.
cudaError_t delta_grad16(const Grad16Args& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lasp
