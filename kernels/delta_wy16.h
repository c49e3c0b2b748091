// The WY form of the gated delta rule's sm_90a forward in 16 bits (delta_wy16, delta_kernels.cu; its operands
// go to the main pass in wgmma_fwd.cu): prep_block's tensor-core program (delta_prep.h) reading k and v in
// their 16-bit dtype through the head maps and writing W_v, W_k in that dtype. Torch-free; the block's inputs
// and outputs (Wy16Io) are host and device code, so tests/cpp runs the program on the host as the kernel does.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

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
  // m^-1 per chunk in k's dtype, (B, H, N, C) contiguous: row n holds row n mod C of its chunk's m^-1 (unit lower
  // triangular; zeros above the diagonal). minv: written (the forward keeps it for the backward); minv_in: read
  // instead of formed (the backward, from the forward's), so W comes out bit for bit as the forward's. Either needs
  // the mma.sync form (wy16_mma_takes) and 16-byte aligned pointers; rows past N are neither written nor read.
  void* minv = nullptr;
  const void* minv_in = nullptr;
  // The kernel (delta_wy16): where k's and v's rows lie on 16-byte boundaries and D, E are multiples of 16, a
  // 16-bit mma.sync form (delta_kernels.cu, wy16_mma_kernel), else prep_block's tensor-core program through
  // Wy16Io; program_only: the latter always (its device check).
  bool program_only = false;
};

// prep_block's inputs and w for one chunk: row pointers made once per block (wy16_io), so the staging and
// put_w do 32-bit index arithmetic only; rows at and past `rows` (past N) read zeros and are not written.
template <typename T16>
struct Wy16Io {
  static constexpr bool kStagesInputs = true;  // prep_block calls stage() and forms pre from the staged gates
  int C, D, E, rows;
  const T16* k;  // row 0 of the chunk in k's head, rows ks apart
  const T16* v;
  int64_t ks, vs;
  bool kvec, vvec;    // k's (v's) rows start on 16-byte boundaries: 8 entries per load
  const float* beta;  // row 0 of the chunk, contiguous
  const float* g;
  T16* wv;  // row 0 of the chunk, contiguous rows of E (W_v) and D (W_k)
  T16* wk;
  float *gam = nullptr, *kk = nullptr, *m = nullptr, *minv = nullptr;  // not written
  // the chunk's row 0 of Wy16Args::minv / minv_in (rows of C), or null (the mma.sync form reads them)
  T16* minv16 = nullptr;
  const T16* minv16_in = nullptr;

  // Thread t's share (of nthreads) of staging the chunk: X (rows x cols, row stride xs) as floats into dst
  // (C rows of ld, zeros past rows and from cols to cols_pad), 8 entries per load where vec. Every load of a
  // thread is issued before its first store (at most kMax vector loads: C = 64, cols <= 128, 256 threads).
  LASP_CHAIN_HD void stage_rows(int t, int nthreads, const T16* x, int64_t xs, bool vec, int cols, int cols_pad,
                                float* dst, int ld) const {
    constexpr int kMax = 4;
    if (!vec || ld % 4 != 0 || C * (cols / 8) > kMax * nthreads) {  // the scalar form
      for (int e = t; e < C * cols_pad; e += nthreads) {
        const int i = e / cols_pad, c = e % cols_pad;
        dst[i * ld + c] = i < rows && c < cols ? static_cast<float>(x[i * xs + c]) : 0.f;
      }
      return;
    }
    struct alignas(16) Raw {
      uint32_t w[4];
    };
    const int per_row = cols / 8, total = C * per_row;  // cols_pad == cols: cols is a multiple of 8
    Raw r[kMax];
    LASP_CHAIN_UNROLL
    for (int u = 0; u < kMax; ++u) {
      const int e = t + u * nthreads, i = e / per_row;
      r[u] = Raw{{0u, 0u, 0u, 0u}};
      if (e < total && i < rows) r[u] = *reinterpret_cast<const Raw*>(x + i * xs + (e % per_row) * 8);
    }
    LASP_CHAIN_UNROLL
    for (int u = 0; u < kMax; ++u) {
      const int e = t + u * nthreads;
      if (e >= total) continue;
      T16 h[8];
      memcpy(h, &r[u], sizeof(h));
      struct alignas(16) F4 {
        float x[4];
      } f[2];
      LASP_CHAIN_UNROLL
      for (int c = 0; c < 8; ++c) f[c / 4].x[c % 4] = static_cast<float>(h[c]);
      F4* row = reinterpret_cast<F4*>(dst + (e / per_row) * ld + (e % per_row) * 8);  // ld % 4 == 0 (tc_ld)
      row[0] = f[0];
      row[1] = f[1];
    }
  }
  // prep_block's step 1: K (C x Dp, Dp = D), V, beta and g.
  LASP_CHAIN_HD void stage(int t, int nthreads, int Dp, float* sK, int ldk, float* sV, int ldv, float* sb,
                           float* sg) const {
    stage_rows(t, nthreads, k, ks, kvec, D, Dp, sK, ldk);
    stage_rows(t, nthreads, v, vs, vvec, E, E, sV, ldv);
    for (int i = t; i < C; i += nthreads) {
      sb[i] = i < rows ? beta[i] : 0.f;
      sg[i] = i < rows ? g[i] : 0.f;
    }
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
  io.kvec = reinterpret_cast<uintptr_t>(io.k) % 16 == 0 && io.ks % 8 == 0 && a.D % 8 == 0;
  io.vvec = reinterpret_cast<uintptr_t>(io.v) % 16 == 0 && io.vs % 8 == 0 && a.E % 8 == 0;
  io.beta = a.beta + bh * a.N + n0;
  io.g = a.g + bh * a.N + n0;
  io.wv = static_cast<T16*>(a.wv) + (bh * a.N + n0) * a.E;
  io.wk = static_cast<T16*>(a.wk) + (bh * a.N + n0) * a.D;
  if (a.minv) io.minv16 = static_cast<T16*>(a.minv) + (bh * a.N + n0) * a.C;
  if (a.minv_in) io.minv16_in = static_cast<const T16*>(a.minv_in) + (bh * a.N + n0) * a.C;
  return io;
}

}  // namespace cuda
}  // namespace lasp
