// The WY form of the gated delta rule's sm_90a forward in 16 bits (delta_wy16, delta_kernels.cu; its operands
// go to the main pass in wgmma_fwd.cu): prep_block's tensor-core program (delta_prep.h) reading k and v in
// their 16-bit dtype through the head maps and writing W_v, W_k in that dtype. Torch-free; the block's inputs
// and outputs (Wy16Io) are host and device code, so tests/cpp runs the program on the host as the kernel does.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "delta_prep.h"

namespace lasp {
namespace cuda {

// Per chunk of C tokens of each (b, h): k (B, Hk, N, D) and v (B, Hv, N, E) (strides in elements of b, head,
// n; the last dim contiguous), beta and the log gates g (fp32, contiguous (B, H, N)); writes W_v (B, H, N, E)
// and W_k (B, H, N, D), contiguous, in k's dtype (rows past N are zeros in the chunk and not written). C = 64,
// D and E multiples of 8 up to 128.
struct Wy16Args {
  int64_t B = 0, H = 0, N = 0;
  int C = 64, D = 0, E = 0;
  int kgroup = 1, vgroup = 1;  // output head h reads k head h / kgroup, v head h / vgroup
  bool bf16 = true;            // else fp16
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t ks[3] = {0, 0, 0}, vs[3] = {0, 0, 0};  // strides of b, head, n
  const float* beta = nullptr;
  const float* g = nullptr;
  void* wv = nullptr;
  void* wk = nullptr;
};

// prep_block's inputs and w for one chunk: row pointers made once per block (wy16_io), so the accessors ignore
// ch and do 32-bit index arithmetic only; rows at and past `rows` (past N) read zeros and are not written.
template <typename T16>
struct Wy16Io {
  int C, D, E, rows;
  const T16* k;  // row 0 of the chunk in k's head, rows ks apart
  const T16* v;
  int64_t ks, vs;
  const float* beta;  // row 0 of the chunk, contiguous
  const float* g;
  T16* wv;  // row 0 of the chunk, contiguous rows of E (W_v) and D (W_k)
  T16* wk;
  float *gam = nullptr, *kk = nullptr, *m = nullptr, *minv = nullptr;  // not written

  LASP_CHAIN_HD float k_at(int64_t, int i, int x) const { return i < rows ? static_cast<float>(k[i * ks + x]) : 0.f; }
  LASP_CHAIN_HD float v_at(int64_t, int i, int x) const { return i < rows ? static_cast<float>(v[i * vs + x]) : 0.f; }
  LASP_CHAIN_HD float beta_at(int64_t, int i) const { return i < rows ? beta[i] : 0.f; }
  LASP_CHAIN_HD float g_at(int64_t, int i) const { return i < rows ? g[i] : 0.f; }
  LASP_CHAIN_HD float pre_at(int64_t, int i) const {  // exp of the chunk's gates up to i, summed in order
    float s = 0.f;
    for (int u = 0; u <= i && u < rows; ++u) s += g[u];
    return expf(s);
  }
  LASP_CHAIN_HD void put_w(int64_t, int i, int col, float x) const {
    if (i >= rows) return;
    if (col < E) {
      wv[i * E + col] = static_cast<T16>(x);
    } else {
      wk[i * D + col - E] = static_cast<T16>(x);
    }
  }
};

// The chunk ch = (b H + h) nc + c of a (nc chunks per (b, h)).
template <typename T16>
LASP_CHAIN_HD Wy16Io<T16> wy16_io(const Wy16Args& a, int64_t ch) {
  const int64_t nc = (a.N + a.C - 1) / a.C, bh = ch / nc, c = ch % nc, b = bh / a.H, h = bh % a.H, n0 = c * a.C;
  Wy16Io<T16> io;
  io.C = a.C, io.D = a.D, io.E = a.E;
  io.rows = (int)(a.N - n0 < a.C ? a.N - n0 : a.C);
  io.k = static_cast<const T16*>(a.k) + b * a.ks[0] + h / a.kgroup * a.ks[1] + n0 * a.ks[2];
  io.v = static_cast<const T16*>(a.v) + b * a.vs[0] + h / a.vgroup * a.vs[1] + n0 * a.vs[2];
  io.ks = a.ks[2], io.vs = a.vs[2];
  io.beta = a.beta + bh * a.N + n0;
  io.g = a.g + bh * a.N + n0;
  io.wv = static_cast<T16*>(a.wv) + (bh * a.N + n0) * a.E;
  io.wk = static_cast<T16*>(a.wk) + (bh * a.N + n0) * a.D;
  return io;
}

}  // namespace cuda
}  // namespace lasp
