// The per-chunk quantities of the gated delta rule's WY form (csrc/delta.cpp, prepare), fused into one block
// program per chunk, for the device (delta_kernels.cu) and the host (tests/cpp), as delta_chain.h. Torch-free.
//
// For one chunk of C tokens, from k (C x D), v (C x E), beta (C), the log gates g (C) and pre (C) =
// exp(cumsum g):
//   gam[i, j] = exp(g[j+1] + ... + g[i]) for j <= i (1 on the diagonal), 0 above it;
//   kk = K K^T;   A = strictly lower part of diag(beta) (gam * kk);   m = I + A;
//   w = m^-1 [diag(beta) V | diag(beta pre) K]      (C x (E + D)), and m^-1 itself where asked
// The block (kPrepThreads threads) keeps K, V in shared memory (rows padded to an odd length: the threads of
// a warp read different rows at one column without bank conflicts), forms gam and then kk, A (each thread an
// 8 x 2 tile of kk: 8 rows shared by the warp, read as broadcasts), inverts m by substitution down its
// columns (one thread per column), and multiplies w = m^-1 R (each thread an 8 x 8 tile, over the columns
// j <= its rows only: m^-1 is lower triangular), forming R's entries from K, V, beta and pre as it reads them.
#pragma once
#include <cmath>
#include <cstdint>

#include "delta_chain.h"  // LASP_CHAIN_HD, HostExec
#include "delta_tiles.h"
#include "warp_tile.h"

namespace lasp {
namespace cuda {

constexpr int kPrepThreads = 256;  // 8 warps: the tiles below assume exactly this many
constexpr int kPrepMaxC = 64;      // 8 row groups of 8 rows

// Contiguous row-major arrays, chunks = B * H * nc.
template <typename T>
struct PrepArgs {
  int64_t chunks = 0;
  int C = 0, D = 0, E = 0;
  const T* k = nullptr;       // (chunks, C, D)
  const T* v = nullptr;       // (chunks, C, E)
  const T* beta = nullptr;    // (chunks, C)
  const T* g = nullptr;       // (chunks, C): log gates (-inf: a reset)
  const T* pre = nullptr;     // (chunks, C): exp(cumsum g)
  T* gam = nullptr;           // (chunks, C, C)
  T* kk = nullptr;            // (chunks, C, C)
  T* m = nullptr;             // (chunks, C, C)
  T* w = nullptr;             // (chunks, C, E + D)
  T* minv = nullptr;          // (chunks, C, C): m^-1 (lower triangular), or null (not written)
  bool tensor_cores = false;  // float, C a multiple of 16: the products on tensor cores (prep_block<.., true>)
};

struct PrepLayout {
  int ldk, ldv, ldc;                 // row lengths in shared memory of K, V and the C x C matrices
  size_t k, v, gt, a, b, bp, elems;  // offsets (elements) of sK, sV, sGT (gam, then m^-1), sA, beta, beta pre
  // tc: the tensor-core form's rows (tc_ld: conflict-free fragment reads); else odd lengths (the SIMT tiles)
  LASP_CHAIN_HD PrepLayout(int C, int D, int E, bool tc = false) {
    ldk = tc ? tc_ld(D) : D | 1;
    ldv = tc ? tc_ld(E) : E | 1;
    ldc = tc ? tc_ld(C) : C | 1;
    k = 0;
    v = k + (size_t)C * ldk;
    gt = v + (size_t)C * ldv;
    a = gt + (size_t)C * ldc;
    b = a + (size_t)C * ldc;
    bp = b + C;
    elems = bp + C;
  }
};

template <typename T>
LASP_CHAIN_HD size_t prep_smem_bytes(int C, int D, int E) {
  return sizeof(T) * PrepLayout(C, D, E).elems;
}
LASP_CHAIN_HD size_t prep_tc_smem_bytes(int C, int D, int E) { return sizeof(float) * PrepLayout(C, D, E, true).elems; }

LASP_CHAIN_HD float prep_exp(float x) { return expf(x); }
LASP_CHAIN_HD double prep_exp(double x) { return exp(x); }

// The program of the block of chunk `ch` on shared memory `smem` (prep_smem_bytes; TC: prep_tc_smem_bytes).
// ex.threads(f) runs f(t) for each of the kPrepThreads threads; ex.sync() is the block's barrier. TC (float, C a
// multiple of 16): K K^T and m^-1 R as tf32 WarpTiles (16 x 32 and 16 x 64 tiles dealt to the warps).
template <typename T, typename Exec, bool TC = false>
LASP_CHAIN_HD void prep_block(const PrepArgs<T>& a, int64_t ch, T* smem, Exec& ex) {
  const int C = a.C, D = a.D, E = a.E, WD = E + D, Dp = TC ? round8(D) : D;
  const PrepLayout L(C, D, E, TC);
  T* sK = smem + L.k;
  T* sV = smem + L.v;
  T* sGT = smem + L.gt;
  T* sA = smem + L.a;
  T* sb = smem + L.b;
  T* sbp = smem + L.bp;
  const T* K = a.k + (size_t)ch * C * D;
  const T* V = a.v + (size_t)ch * C * E;
  const T* G = a.g + (size_t)ch * C;
  const size_t cc = (size_t)ch * C * C;
  ex.threads([&](int t) {  // 1. K, V, beta, beta pre -> shared memory
    for (int i = t; i < C * Dp; i += kPrepThreads)
      sK[(i / Dp) * L.ldk + i % Dp] = i % Dp < D ? K[(i / Dp) * D + i % Dp] : T(0);
    for (int i = t; i < C * E; i += kPrepThreads) sV[(i / E) * L.ldv + i % E] = V[i];
    for (int i = t; i < C; i += kPrepThreads) {
      const T b = a.beta[(size_t)ch * C + i];
      sb[i] = b;
      sbp[i] = b * a.pre[(size_t)ch * C + i];
    }
  });
  ex.threads([&](int t) {  // 2. gam (each entry the sum of its gates, in order, then one exp)
    for (int e = t; e < C * C; e += kPrepThreads) {
      const int i = e / C, j = e % C;
      T x = 0;
      if (j <= i) {
        T s = 0;
        for (int u = j + 1; u <= i; ++u) s += G[u];
        x = prep_exp(s);
      }
      sGT[i * L.ldc + j] = x;
      a.gam[cc + e] = x;
    }
  });
  ex.sync();
  auto kk_entry = [&](int i, int j, T kk) {
    const T A = j < i ? sb[i] * sGT[i * L.ldc + j] * kk : T(0);
    a.kk[cc + (size_t)i * C + j] = kk;
    a.m[cc + (size_t)i * C + j] = i == j ? T(1) : A;
    sA[i * L.ldc + j] = A;
  };
  if constexpr (TC) {
    ex.warps([&](int w) {  // 3. kk, A, m
      const int rtiles = C / 16, ctiles = (C + 31) / 32;
      for (int job = w; job < rtiles * ctiles; job += kPrepThreads / 32) {
        const int m0 = (job % rtiles) * 16, n0 = (job / rtiles) * 32;
        WarpTile<4> tile;
        tile.zero();
        tile.mma(
            Dp, [&](int m, int k) { return sK[(m0 + m) * L.ldk + k]; },
            [&](int k, int n) { return n0 + n < C ? sK[(n0 + n) * L.ldk + k] : 0.f; });
        tile.each([&](int m, int n, float& v) {
          if (n0 + n < C) kk_entry(m0 + m, n0 + n, v);
        });
      }
    });
  } else {
    ex.threads([&](int t) {  // 3. kk, A, m
      cc_tile<T>(
          t, C, D, [&](int i, int x) { return sK[i * L.ldk + x]; }, [&](int j, int x) { return sK[j * L.ldk + x]; },
          kk_entry);
    });
  }
  ex.sync();
  ex.threads([&](int t) {  // 4. m^-1 into sGT, one column per thread: x[i] = [i == c] - sum_{j<i} A[i, j] x[j]
    if (t >= C) return;
    for (int i = 0; i < C; ++i) {
      T x = i == t ? T(1) : T(0);
      for (int j = 0; j < i; ++j) x -= sA[i * L.ldc + j] * sGT[j * L.ldc + t];
      sGT[i * L.ldc + t] = x;
    }
  });
  ex.sync();
  if (a.minv) {
    ex.threads([&](int t) {
      for (int e = t; e < C * C; e += kPrepThreads) a.minv[cc + e] = sGT[(e / C) * L.ldc + e % C];
    });
  }
  auto rhs = [&](int j, int col) {
    return col < E ? sb[j] * sV[j * L.ldv + col] : (col < WD ? sbp[j] * sK[j * L.ldk + col - E] : T(0));
  };
  if constexpr (TC) {
    ex.warps([&](int w) {  // 5. w = m^-1 R over the columns j < the tile's last row (m^-1 is lower triangular)
      const int rtiles = C / 16, ctiles = (WD + 63) / 64;
      for (int job = w; job < rtiles * ctiles; job += kPrepThreads / 32) {
        const int m0 = (job % rtiles) * 16, n0 = (job / rtiles) * 64;
        WarpTile<8> tile;
        tile.zero();
        tile.mma(
            m0 + 16, [&](int m, int k) { return sGT[(m0 + m) * L.ldc + k]; },
            [&](int k, int n) { return rhs(k, n0 + n); });
        tile.each([&](int m, int n, float& v) {
          if (n0 + n < WD) a.w[((size_t)ch * C + m0 + m) * WD + n0 + n] = v;
        });
      }
    });
    ex.done();
    return;
  }
  ex.threads([&](int t) {  // 5. w = m^-1 R over the columns j <= the tile's rows (m^-1 is lower triangular)
    const RowTile rt(t, C);
    if (rt.r0 >= C) return;
    const int jmax = rt.r0 + 8 < C ? rt.r0 + 8 : C;
    for (int base = 0; base < WD; base += 256) {
      T acc[8][8] = {};
      tile_mac(
          acc, rt, 0, jmax, base, WD, [&](int i, int j) { return sGT[i * L.ldc + j]; }, rhs);
      tile_store(acc, rt, C, base, WD, [&](int i, int col, T v) { a.w[((size_t)ch * C + i) * WD + col] = v; });
    }
  });
  ex.done();
}

}  // namespace cuda
}  // namespace lasp
