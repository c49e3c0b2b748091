// The gated delta rule's two chains in 16 bits for its backward (delta_chain16.cu), the first two of the three
// kernels that kernels/DESIGN.md plans for the sm_80+ / sm_90a backward ("The sm_90a forward", the backward).
// Per chunk of C = 64 tokens, with suf[i] = exp(g[i+1] + ... + g[C-1]), pre[i] = exp(g[0] + ... + g[i]) and
// Gam[i][j] = exp(g[j+1] + ... + g[i]) (j <= i) within the chunk:
//
// The forward chain (delta_states16), first chunk to last, S the state entering the chunk (S0 for the first):
//   Sb[c] = S;   U = W_v - W_k S   (C x E);   S <- pre[C-1] S + (diag(suf) K)^T U
// and the final state after the last chunk.
//
// The reverse chain (delta_rev16), last chunk to first, G the gradient of the state leaving the chunk (the final
// state's cotangent for the last chunk):
//   dSe[c] = G;
//   dU     = scale (Q K^T * Gam)^T dO + diag(suf) K G                      (C x E)
//   G     <- pre[C-1] G + scale Q^T diag(pre) dO - W_k^T dU                 (D x E)
// and after the first chunk dS0 = G, the gradient of the state entering the piece. Torch-free.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace lasp {
namespace cuda {

// q (B, Hq, N, D) and k (B, Hk, N, D) as the op got them (strides of b, head, n; the last dim contiguous), read
// through the head maps (output head h reads q head h / qgroup, k head h / kgroup); W_k (B, H, N, D) contiguous
// (the WY kernel's); dO (B, H, N, E) (strides of b, h, n); the log gates g (B, H, N) fp32 contiguous; the
// final state's cotangent dS_end (B, H, D, E) fp32 contiguous or null (zero). Writes dU (B, H, N, E) and dSe
// (B, H, nc, D, E), contiguous, in q's dtype, and dS0 (B, H, D, E) fp32.
struct Rev16Args {
  int64_t B = 0, H = 0, N = 0;
  int D = 0, E = 0;
  int qgroup = 1, kgroup = 1;
  bool bf16 = true;  // else fp16
  const void* q = nullptr;
  const void* k = nullptr;
  const void* wk = nullptr;
  const void* dout = nullptr;
  int64_t qs[3] = {0, 0, 0}, ks[3] = {0, 0, 0}, ds[3] = {0, 0, 0};
  const float* g = nullptr;
  const float* dS_end = nullptr;
  float scale = 1.f;
  void* du = nullptr;
  void* dse = nullptr;
  float* dS0 = nullptr;
};

// k (B, Hk, N, D) as the op got it (strides of b, head, n; the last dim contiguous; output head h reads k head
// h / kgroup); W_v (B, H, N, E) and W_k (B, H, N, D) contiguous (the WY kernel's); the log gates g (B, H, N) fp32
// contiguous; the incoming state S0 (B, H, D, E) fp32 contiguous or null (zero). Writes U (B, H, N, E) and Sb
// (B, H, nc, D, E), contiguous, in k's dtype, and the final state (B, H, D, E) fp32.
struct States16Args {
  int64_t B = 0, H = 0, N = 0;
  int D = 0, E = 0;
  int kgroup = 1;
  bool bf16 = true;  // else fp16
  const void* k = nullptr;
  int64_t ks[3] = {0, 0, 0};
  const void* wv = nullptr;
  const void* wk = nullptr;
  const float* g = nullptr;
  const float* S0 = nullptr;
  void* u = nullptr;
  void* sb = nullptr;
  float* fin = nullptr;
};
// D in {64, 128}, E a multiple of 64, k's rows on 16-byte boundaries, N >= 0.
bool delta_states16_takes(const States16Args& args);
// One block of 256 threads per (b, h, 64 columns of E); sm_80 or later. cudaErrorInvalidValue where
// delta_states16_takes is false.
cudaError_t delta_states16(const States16Args& args, cudaStream_t stream);

// D in {64, 128}, E a multiple of 64, rows of q, k, dO on 16-byte boundaries (strides multiples of 8, pointers
// aligned), N >= 0.
bool delta_rev16_takes(const Rev16Args& args);
// One block of 256 threads per (b, h, 64 columns of E); sm_80 or later. cudaErrorInvalidValue where
// delta_rev16_takes is false.
cudaError_t delta_rev16(const Rev16Args& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lasp
