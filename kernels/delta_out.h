// The output of the gated delta rule's chunked form (csrc/delta.cpp, the forward), one block program per chunk
// for the device (delta_kernels.cu) and the host (tests/cpp), as delta_chain.h. Torch-free.
//
// For one chunk, from q, k (C x D), gam (C x C, lower with the diagonal), pre (C), the state entering the chunk
// S (D x E) and the chain's U (C x E):
//   o = scale (diag(pre) Q S + (Q K^T * gam) U)
// The block (kOutThreads threads) keeps Q and K in shared memory (odd row lengths: no bank conflicts when a
// warp reads different rows at one column) and forms P = Q K^T * gam there (8 x 2 register tiles per thread,
// only the lower triangle's tiles), then o in 8 x 8 register tiles (the 8 rows shared by a warp, read as
// broadcasts; the columns consecutive across the warp, S's and U's rows read coalesced and shared by the
// block's warps through L1), over Q's D columns and P's columns up to the tile's last row.
#pragma once
#include <cstdint>

#include "delta_chain.h"  // LASP_CHAIN_HD, HostExec

namespace lasp {
namespace cuda {

constexpr int kOutThreads = 256;  // 8 warps: the tiles below assume exactly this many
constexpr int kOutMaxC = 64;

// Contiguous row-major arrays, chunks = B * H * nc.
template <typename T>
struct OutArgs {
  int64_t chunks = 0;
  int C = 0, D = 0, E = 0;
  T scale = 1;
  const T* q = nullptr;    // (chunks, C, D)
  const T* k = nullptr;    // (chunks, C, D)
  const T* gam = nullptr;  // (chunks, C, C)
  const T* pre = nullptr;  // (chunks, C)
  const T* S = nullptr;    // (chunks, D, E)
  const T* U = nullptr;    // (chunks, C, E)
  T* o = nullptr;          // (chunks, C, E)
};

struct OutLayout {
  int ldq, ldp;
  size_t q, k, p, elems;
  LASP_CHAIN_HD OutLayout(int C, int D) {
    ldq = D | 1;
    ldp = C | 1;
    q = 0;
    k = q + (size_t)C * ldq;
    p = k + (size_t)C * ldq;
    elems = p + (size_t)C * ldp;
  }
};

template <typename T>
LASP_CHAIN_HD size_t out_smem_bytes(int C, int D) {
  return sizeof(T) * OutLayout(C, D).elems;
}

template <typename T, typename Exec>
LASP_CHAIN_HD void out_block(const OutArgs<T>& a, int64_t ch, T* smem, Exec& ex) {
  const int C = a.C, D = a.D, E = a.E;
  const OutLayout L(C, D);
  T* sQ = smem + L.q;
  T* sK = smem + L.k;
  T* sP = smem + L.p;
  const T* Q = a.q + (size_t)ch * C * D;
  const T* K = a.k + (size_t)ch * C * D;
  const T* G = a.gam + (size_t)ch * C * C;
  const T* S = a.S + (size_t)ch * D * E;
  const T* U = a.U + (size_t)ch * C * E;
  ex.threads([&](int t) {  // 1. Q, K -> shared memory
    for (int i = t; i < C * D; i += kOutThreads) {
      sQ[(i / D) * L.ldq + i % D] = Q[i];
      sK[(i / D) * L.ldq + i % D] = K[i];
    }
  });
  ex.sync();
  ex.threads([&](int t) {  // 2. P = Q K^T * gam: rows 8 (t / 32) + r, columns t % 32 + 32 n
    const int r0 = (t / 32) * 8, lane = t % 32;
    int rr[8], cr[2];
    for (int r = 0; r < 8; ++r) rr[r] = r0 + r < C ? r0 + r : C - 1;
    for (int n = 0; n < 2; ++n) cr[n] = lane + 32 * n < C ? lane + 32 * n : C - 1;
    T acc[8][2] = {};
    if (r0 < C && lane <= r0 + 7) {  // a tile with an entry on or below the diagonal (else all 0)
      for (int d = 0; d < D; ++d) {
        T x[8], y[2];
        for (int r = 0; r < 8; ++r) x[r] = sQ[rr[r] * L.ldq + d];
        for (int n = 0; n < 2; ++n) y[n] = sK[cr[n] * L.ldq + d];
        for (int r = 0; r < 8; ++r)
          for (int n = 0; n < 2; ++n) acc[r][n] += x[r] * y[n];
      }
    }
    for (int r = 0; r < 8; ++r)
      for (int n = 0; n < 2; ++n) {
        const int i = r0 + r, j = lane + 32 * n;
        if (i < C && j < C) sP[i * L.ldp + j] = j <= i ? acc[r][n] * G[i * C + j] : T(0);
      }
  });
  ex.sync();
  ex.threads([&](int t) {  // 3. o = scale (pre Q S + P U): rows 8 (t / 32) + r, columns base + t % 32 + 32 n
    const int r0 = (t / 32) * 8, lane = t % 32;
    if (r0 >= C) return;
    const int jmax = r0 + 8 < C ? r0 + 8 : C;  // P is 0 right of its diagonal
    int rr[8];
    for (int r = 0; r < 8; ++r) rr[r] = r0 + r < C ? r0 + r : C - 1;
    for (int base = 0; base < E; base += 256) {
      T acc[8][8] = {};
      for (int d = 0; d < D; ++d) {
        T x[8], y[8];
        for (int r = 0; r < 8; ++r) x[r] = sQ[rr[r] * L.ldq + d];
        for (int n = 0; n < 8; ++n) {
          const int col = base + lane + 32 * n;
          y[n] = col < E ? S[(size_t)d * E + col] : T(0);
        }
        for (int r = 0; r < 8; ++r)
          for (int n = 0; n < 8; ++n) acc[r][n] += x[r] * y[n];
      }
      for (int r = 0; r < 8; ++r) {
        const T p = a.pre[(size_t)ch * C + rr[r]];
        for (int n = 0; n < 8; ++n) acc[r][n] *= p;
      }
      for (int j = 0; j < jmax; ++j) {
        T x[8], y[8];
        for (int r = 0; r < 8; ++r) x[r] = sP[rr[r] * L.ldp + j];
        for (int n = 0; n < 8; ++n) {
          const int col = base + lane + 32 * n;
          y[n] = col < E ? U[(size_t)j * E + col] : T(0);
        }
        for (int r = 0; r < 8; ++r)
          for (int n = 0; n < 8; ++n) acc[r][n] += x[r] * y[n];
      }
      for (int r = 0; r < 8; ++r) {
        if (r0 + r >= C) break;
        T* orow = a.o + ((size_t)ch * C + r0 + r) * E;
        for (int n = 0; n < 8; ++n) {
          const int col = base + lane + 32 * n;
          if (col < E) orow[col] = acc[r][n] * a.scale;
        }
      }
    }
  });
}

}  // namespace cuda
}  // namespace lasp
