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
#include "delta_tiles.h"
#include "warp_tile.h"

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
  const T* q = nullptr;       // (chunks, C, D)
  const T* k = nullptr;       // (chunks, C, D)
  const T* gam = nullptr;     // (chunks, C, C)
  const T* pre = nullptr;     // (chunks, C)
  const T* S = nullptr;       // (chunks, D, E)
  const T* U = nullptr;       // (chunks, C, E)
  T* o = nullptr;             // (chunks, C, E)
  bool tensor_cores = false;  // float, C a multiple of 16: out_tc_block (tf32 products; the op's inputs were 16-bit)
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
  ex.threads([&](int t) {  // 2. P = Q K^T * gam (tiles wholly above the diagonal: 0, no products)
    const bool below = t % 32 <= (t / 32) * 8 + 7;
    cc_tile<T>(
        t, C, below ? D : 0, [&](int i, int x) { return sQ[i * L.ldq + x]; },
        [&](int j, int x) { return sK[j * L.ldq + x]; },
        [&](int i, int j, T v) { sP[i * L.ldp + j] = j <= i ? v * G[i * C + j] : T(0); });
  });
  ex.sync();
  ex.threads([&](int t) {  // 3. o = scale (pre Q S + P U), P over the columns up to the tile's rows
    const RowTile rt(t, C);
    if (rt.r0 >= C) return;
    const int jmax = rt.r0 + 8 < C ? rt.r0 + 8 : C;
    for (int base = 0; base < E; base += 256) {
      T acc[8][8] = {};
      tile_mac(
          acc, rt, 0, D, base, E, [&](int i, int d) { return sQ[i * L.ldq + d]; },
          [&](int d, int col) { return S[(size_t)d * E + col]; });
      for (int r = 0; r < 8; ++r) {
        const T p = a.pre[(size_t)ch * C + rt.rr[r]];
        for (int n = 0; n < 8; ++n) acc[r][n] *= p;
      }
      tile_mac(
          acc, rt, 0, jmax, base, E, [&](int i, int j) { return sP[i * L.ldp + j]; },
          [&](int j, int col) { return U[(size_t)j * E + col]; });
      tile_store(acc, rt, C, base, E, [&](int i, int col, T v) { a.o[((size_t)ch * C + i) * E + col] = v * a.scale; });
    }
  });
  ex.done();
}

// The tensor-core form (float): the same o with tf32 products, one WarpTile per warp and job. Q and K in shared
// memory with rows of round32(D) + 4 floats (zero past D), P with rows of round32(C) + 4: the fragments' reads
// (8 rows x 4 columns per instruction) hit 32 banks. Jobs: P's 16-row x 32-column tiles, then o's 16 x 64
// tiles, dealt round-robin to the 8 warps; o's P U product over P's columns up to the tile's last row.
struct OutTcLayout {
  int Dp, ldq, ldp;
  size_t q, k, p, elems;
  LASP_CHAIN_HD OutTcLayout(int C, int D) {
    Dp = (D + 7) / 8 * 8;
    ldq = (D + 31) / 32 * 32 + 4;
    ldp = (C + 31) / 32 * 32 + 4;
    q = 0;
    k = q + (size_t)C * ldq;
    p = k + (size_t)C * ldq;
    elems = p + (size_t)C * ldp;
  }
};

LASP_CHAIN_HD size_t out_tc_smem_bytes(int C, int D) { return sizeof(float) * OutTcLayout(C, D).elems; }

template <typename Exec>
LASP_CHAIN_HD void out_tc_block(const OutArgs<float>& a, int64_t ch, float* smem, Exec& ex) {
  const int C = a.C, D = a.D, E = a.E;
  const OutTcLayout L(C, D);
  float* sQ = smem + L.q;
  float* sK = smem + L.k;
  float* sP = smem + L.p;
  const float* Q = a.q + (size_t)ch * C * D;
  const float* K = a.k + (size_t)ch * C * D;
  const float* G = a.gam + (size_t)ch * C * C;
  const float* pre = a.pre + (size_t)ch * C;
  const float* S = a.S + (size_t)ch * D * E;
  const float* U = a.U + (size_t)ch * C * E;
  float* O = a.o + (size_t)ch * C * E;
  ex.threads([&](int t) {  // 1. Q, K -> shared memory, zero past D up to a multiple of 8
    for (int i = t; i < C * L.Dp; i += kOutThreads) {
      const int r = i / L.Dp, x = i % L.Dp;
      sQ[r * L.ldq + x] = x < D ? Q[(size_t)r * D + x] : 0.f;
      sK[r * L.ldq + x] = x < D ? K[(size_t)r * D + x] : 0.f;
    }
  });
  ex.sync();
  const int rtiles = C / 16;
  ex.warps([&](int w) {  // 2. P = Q K^T * gam, 16 x 32 tiles (those wholly above the diagonal: 0)
    const int ctiles = (C + 31) / 32;
    for (int job = w; job < rtiles * ctiles; job += kOutThreads / 32) {
      const int m0 = (job % rtiles) * 16, n0 = (job / rtiles) * 32;
      WarpTile<4> tile;
      tile.zero();
      if (n0 <= m0 + 15)
        tile.mma(
            L.Dp, [&](int m, int k) { return sQ[(m0 + m) * L.ldq + k]; },
            [&](int k, int n) { return n0 + n < C ? sK[(n0 + n) * L.ldq + k] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        const int i = m0 + m, j = n0 + n;
        if (j < C) sP[i * L.ldp + j] = j <= i ? v * G[(size_t)i * C + j] : 0.f;
      });
    }
  });
  ex.sync();
  ex.warps([&](int w) {  // 3. o = scale (pre Q S + P U), 16 x 64 tiles
    const int ctiles = (E + 63) / 64;
    for (int job = w; job < rtiles * ctiles; job += kOutThreads / 32) {
      const int m0 = (job % rtiles) * 16, n0 = (job / rtiles) * 64;
      WarpTile<8> tile;
      tile.zero();
      tile.mma(
          L.Dp, [&](int m, int k) { return sQ[(m0 + m) * L.ldq + k]; },
          [&](int k, int n) { return k < D && n0 + n < E ? S[(size_t)k * E + n0 + n] : 0.f; });
      tile.each([&](int m, int, float& v) { v *= pre[m0 + m]; });
      tile.mma(
          m0 + 16, [&](int m, int k) { return sP[(m0 + m) * L.ldp + k]; },
          [&](int k, int n) { return n0 + n < E ? U[(size_t)k * E + n0 + n] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        if (n0 + n < E) O[(size_t)(m0 + m) * E + n0 + n] = v * a.scale;
      });
    }
  });
  ex.done();
}

}  // namespace cuda
}  // namespace lasp
