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
#if defined(__CUDACC__)
#include "mma.cuh"
#endif

namespace lasp {
namespace cuda {

constexpr int kPrepThreads = 256;  // 8 warps: the tiles below assume exactly this many
constexpr int kPrepMaxC = 64;      // 8 row groups of 8 rows

// Contiguous row-major arrays, chunks = B * H * nc. The block program reads its inputs and writes w through
// the accessors below (the sm_90a forward's 16-bit WY kernel has its own, delta_wy16.h); gam, kk, m
// and minv are written where not null. An Args type with kStagesInputs instead stages K, V, beta and g itself
// (stage(), one thread's share) and lets the program form pre = exp(cumsum g) from the staged gates.
template <typename T>
struct PrepArgs {
  static constexpr bool kStagesInputs = false;
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

  LASP_CHAIN_HD T k_at(int64_t ch, int i, int x) const { return k[((size_t)ch * C + i) * D + x]; }
  LASP_CHAIN_HD T v_at(int64_t ch, int i, int x) const { return v[((size_t)ch * C + i) * E + x]; }
  LASP_CHAIN_HD T beta_at(int64_t ch, int i) const { return beta[(size_t)ch * C + i]; }
  LASP_CHAIN_HD T g_at(int64_t ch, int i) const { return g[(size_t)ch * C + i]; }
  LASP_CHAIN_HD T pre_at(int64_t ch, int i) const { return pre[(size_t)ch * C + i]; }
  LASP_CHAIN_HD void put_w(int64_t ch, int i, int col, T x) const { w[((size_t)ch * C + i) * (E + D) + col] = x; }
};

struct PrepLayout {
  int ldk, ldv, ldc;                 // row lengths in shared memory of K, V and the C x C matrices
  size_t k, v, gt, a, b, bp, g, elems;  // offsets (elements) of sK, sV, sGT (gam, then m^-1), sA, beta, beta pre, g
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
    g = bp + C;
    elems = g + C;
  }
};

template <typename T>
LASP_CHAIN_HD size_t prep_smem_bytes(int C, int D, int E) {
  return sizeof(T) * PrepLayout(C, D, E).elems;
}
LASP_CHAIN_HD size_t prep_tc_smem_bytes(int C, int D, int E) { return sizeof(float) * PrepLayout(C, D, E, true).elems; }

LASP_CHAIN_HD float prep_exp(float x) { return expf(x); }
LASP_CHAIN_HD double prep_exp(double x) { return exp(x); }

// The gates' sums within a chunk, thread t's share of nthreads (at least C + 1): put_gam(i, j, x) for every
// i, j < C, x = exp(g[j+1] + ... + g[i]) for j <= i (1 on the diagonal) and 0 above it, and where with_pre
// put_pre(i, exp(g[0] + ... + g[i])). Each sum is its gates added in order, so a -inf gate gives exact zeros
// across it: thread (part, j) runs down column j (j = -1: pre) over its part of the rows, first adding the
// gates above the part (the same additions in the same order as the entry's own sum, so every part gives the
// bits of a sum started at the column's first gate). sg: the chunk's gates (C entries).
template <typename T, typename FG, typename FP>
LASP_CHAIN_HD void gate_parts(int t, int nthreads, int C, const T* sg, bool with_pre, FG put_gam, FP put_pre) {
  const int parts = nthreads / (C + 1), rpp = (C + parts - 1) / parts, part = t / (C + 1), j = t % (C + 1) - 1;
  const int r0 = part * rpp, r1 = r0 + rpp < C ? r0 + rpp : C;
  if (part >= parts || r0 >= C || (j < 0 && !with_pre)) return;
  T s = 0;
  for (int u = j + 1; u < r0; ++u) s += sg[u];
  for (int i = r0; i < r1; ++i) {
    if (j < 0) {
      s += sg[i];
      put_pre(i, prep_exp(s));
      continue;
    }
    T x = 0;
    if (i >= j) {
      if (i > j) s += sg[i];
      x = prep_exp(s);
    }
    put_gam(i, j, x);
  }
}

// gate_parts' pre column alone, one thread per row (t < C): put_pre(t, exp(g[0] + ... + g[t])), the gates added
// in order from g[0] as gate_parts adds them, so the same bits.
template <typename T, typename FP>
LASP_CHAIN_HD void gate_pre(int t, int C, const T* sg, FP put_pre) {
  if (t >= C) return;
  T s = 0;
  for (int u = 0; u <= t; ++u) s += sg[u];
  put_pre(t, prep_exp(s));
}

// The inverse of the unit lower triangular m = I + A (A in sA, strictly lower; rows of ldc) into sGT, in blocks
// of 16 rows: each diagonal block by substitution down its columns (one thread per column: 16 steps, not C),
// then the blocks below the diagonal one diagonal at a time, L[i][j] = -L[i][i] (sum_{j <= l < i} A[i][l]
// L[l][j]) over blocks, as two products between barriers (SIMT, in T: m^-1 keeps T's precision). The sum goes
// to block (j, i) of sA, above its diagonal, which nothing reads. Blocks above the diagonal are written 0.
template <typename T, typename Exec>
LASP_CHAIN_HD void invert_unit_lower(int C, int ldc, T* sA, T* sGT, Exec& ex) {
  constexpr int kB = 16;
  const int nb = (C + kB - 1) / kB;
  ex.threads([&](int t) {
    if (t >= C) return;
    const int r0 = t / kB * kB, r1 = r0 + kB < C ? r0 + kB : C;
    for (int i = 0; i < r0; ++i) sGT[i * ldc + t] = T(0);
    for (int i = r0; i < r1; ++i) {
      T x = i == t ? T(1) : T(0);
      for (int j = r0; j < i; ++j) x -= sA[i * ldc + j] * sGT[j * ldc + t];
      sGT[i * ldc + t] = x;
    }
  });
  ex.sync();
  for (int d = 1; d < nb; ++d) {
    const int entries = (nb - d) * kB * kB;  // blocks (j + d, j), j < nb - d
    ex.threads([&](int t) {                  // X = sum_l A[i][l] L[l][j] -> sA block (j, i)
      for (int e = t; e < entries; e += kPrepThreads) {
        const int j = e / (kB * kB), i = j + d, r = e / kB % kB, c = e % kB;
        if (i * kB + r >= C) continue;
        T x = 0;
        for (int l = j * kB; l < i * kB; ++l) x += sA[(i * kB + r) * ldc + l] * sGT[l * ldc + j * kB + c];
        sA[(j * kB + r) * ldc + i * kB + c] = x;
      }
    });
    ex.sync();
    ex.threads([&](int t) {  // L[i][j] = -L[i][i] X
      for (int e = t; e < entries; e += kPrepThreads) {
        const int j = e / (kB * kB), i = j + d, r = e / kB % kB, c = e % kB;
        if (i * kB + r >= C) continue;
        T x = 0;
        for (int l = 0; l < kB && i * kB + l < C; ++l)
          x += sGT[(i * kB + r) * ldc + i * kB + l] * sA[(j * kB + l) * ldc + i * kB + c];
        sGT[(i * kB + r) * ldc + j * kB + c] = -x;
      }
    });
    ex.sync();
  }
}

// The program of the block of chunk `ch` on shared memory `smem` (prep_smem_bytes; TC: prep_tc_smem_bytes).
// ex.threads(f) runs f(t) for each of the kPrepThreads threads; ex.sync() is the block's barrier. TC (float, C a
// multiple of 16): K K^T and m^-1 R as tf32 WarpTiles (16 x 32 and 16 x 64 tiles dealt to the warps).
// Args: PrepArgs<T>, or any type with its members C, D, E, gam, kk, m, minv and its accessors.
template <typename T, typename Exec, bool TC = false, typename Args = PrepArgs<T>>
LASP_CHAIN_HD void prep_block(const Args& a, int64_t ch, T* smem, Exec& ex) {
  const int C = a.C, D = a.D, E = a.E, WD = E + D, Dp = TC ? round8(D) : D;
  const PrepLayout L(C, D, E, TC);
  T* sK = smem + L.k;
  T* sV = smem + L.v;
  T* sGT = smem + L.gt;
  T* sA = smem + L.a;
  T* sb = smem + L.b;
  T* sbp = smem + L.bp;
  T* sg = smem + L.g;
  const size_t cc = (size_t)ch * C * C;
  if constexpr (Args::kStagesInputs) {
    ex.threads([&](int t) { a.stage(t, kPrepThreads, Dp, sK, L.ldk, sV, L.ldv, sb, sg); });  // 1. K, V, beta, g
  } else {
    ex.threads([&](int t) {  // 1. K, V, beta, beta pre, g -> shared memory
      for (int i = t; i < C * Dp; i += kPrepThreads)
        sK[(i / Dp) * L.ldk + i % Dp] = i % Dp < D ? T(a.k_at(ch, i / Dp, i % Dp)) : T(0);
      for (int i = t; i < C * E; i += kPrepThreads) sV[(i / E) * L.ldv + i % E] = T(a.v_at(ch, i / E, i % E));
      for (int i = t; i < C; i += kPrepThreads) {
        const T b = T(a.beta_at(ch, i));
        sb[i] = b;
        sbp[i] = b * T(a.pre_at(ch, i));
        sg[i] = T(a.g_at(ch, i));
      }
    });
  }
  ex.sync();
  ex.threads([&](int t) {  // 2. gam, and pre where the program forms it
    gate_parts<T>(
        t, kPrepThreads, C, sg, Args::kStagesInputs,
        [&](int i, int j, T x) {
          sGT[i * L.ldc + j] = x;
          if (a.gam) a.gam[cc + (size_t)i * C + j] = x;
        },
        [&](int i, T p) { sbp[i] = sb[i] * p; });
  });
  ex.sync();
  auto kk_entry = [&](int i, int j, T kk) {
    const T A = j < i ? sb[i] * sGT[i * L.ldc + j] * kk : T(0);
    if (a.kk) a.kk[cc + (size_t)i * C + j] = kk;
    if (a.m) a.m[cc + (size_t)i * C + j] = i == j ? T(1) : A;
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
  invert_unit_lower(C, L.ldc, sA, sGT, ex);  // 4. m^-1 into sGT
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
          if (n0 + n < WD) a.put_w(ch, m0 + m, n0 + n, v);
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
      tile_store(acc, rt, C, base, WD, [&](int i, int col, T v) { a.put_w(ch, i, col, v); });
    }
  });
  ex.done();
}

#if defined(__CUDACC__)
// The 16-bit kernels' A = diag(beta) (Gam * K K^T), strictly lower (fp32, rows of ldc), from K (kC = 64 rows of
// 16-bit entries, rows of ldk, D a multiple of 16) in shared memory: warp w < 6 forms one 16 x 32 tile on or below
// the diagonal (rows 16 rt, columns 32 ch: rt = 0..3 with ch = 0, rt = 2, 3 with ch = 1) on mma.sync, its entries
// on and above the diagonal 0; the other warps nothing. The entries of tiles wholly above the diagonal are not
// written.
template <typename T16>
__device__ __forceinline__ void wy_a16(const T16* sK, int ldk, int D, const float* sbeta, const float* sGam, float* sA,
                                       int ldc) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, cq = lane & 3;
  if (w >= 6) return;
  const int rt = w < 4 ? w : w - 2, m0 = rt * 16, h0 = w < 4 ? 0 : 32;
  float acc[4][4] = {};
  mma::mac<false, true>(acc, sK, ldk, sK, ldk, m0, h0, 0, D);
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = m0 + gq + (e >> 1) * 8, j = h0 + 8 * nt + 2 * cq + (e & 1);
      sA[i * ldc + j] = j < i ? sbeta[i] * sGam[i * ldc + j] * acc[nt][e] : 0.f;
    }
}

// acc (16 x 16, two m16n8 fragments) += A B over k < K (a multiple of 8), fp32 operands in shared memory (A rows of
// lda, B rows of ldb, both from their first entry) on tf32 mma.sync in three passes (hi hi + hi lo + lo hi, each
// operand split as x = hi + lo with hi = tf32(x)): products close to fp32 ones.
__device__ __forceinline__ void mac_tf32x3(float (&acc)[2][4], const float* A, int lda, const float* B, int ldb,
                                           int K) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  for (int k0 = 0; k0 < K; k0 += 8) {
    const float ax[4] = {A[g * lda + k0 + c], A[(g + 8) * lda + k0 + c], A[g * lda + k0 + c + 4],
                         A[(g + 8) * lda + k0 + c + 4]};
    uint32_t ah[4], al[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      ah[e] = tf32_bits(ax[e]);
      al[e] = tf32_bits(ax[e] - __uint_as_float(ah[e]));
    }
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const float b0 = B[(k0 + c) * ldb + 8 * n + g], b1 = B[(k0 + c + 4) * ldb + 8 * n + g];
      const uint32_t bh0 = tf32_bits(b0), bh1 = tf32_bits(b1);
      const uint32_t bl0 = tf32_bits(b0 - __uint_as_float(bh0)), bl1 = tf32_bits(b1 - __uint_as_float(bh1));
      tf32_mma(acc[n], al, bh0, bh1);
      tf32_mma(acc[n], ah, bl0, bl1);
      tf32_mma(acc[n], ah, bh0, bh1);
    }
  }
}

// invert_unit_lower for C = 64 and blocks of 256 threads, on tensor cores: m^-1 of m = I + A (A strictly lower in
// sA, fp32, rows of ldc) into sGT (rows of ldc). The diagonal 16 x 16 blocks by substitution, four threads per
// column (each row's sum split over them, added by shuffles); then the blocks below the diagonal one diagonal at a
// time, X = sum_{j <= l < i} A[i][l] L[l][j] (into sA's block (j, i), above its diagonal, which nothing reads) and
// L[i][j] = -L[i][i] X, one warp per block, on mac_tf32x3. Ends with the block's barrier.
__device__ __forceinline__ void invert_unit_lower64(float* sA, float* sGT, int ldc) {
  constexpr int kB = 16;
  const int t = threadIdx.x, w = t >> 5, col = t >> 2, p = t & 3, r0 = col & ~(kB - 1);
  // entry e of n-tile n of a warp's 16 x 16 fragment pair: row and column offsets in the block
  auto frow = [&](int e) { return (t & 31) / 4 + (e >> 1) * 8; };
  auto fcol = [&](int n, int e) { return 8 * n + 2 * (t & 3) + (e & 1); };
  {
    float gc[4] = {0.f, 0.f, 0.f, 0.f};  // L[r0 + 4 q + p][col], q < 4
#pragma unroll
    for (int ii = 0; ii < kB; ++ii) {
      float s = 0.f;
#pragma unroll
      for (int q = 0; q < 4; ++q)
        if (4 * q + p < ii) s += sA[(r0 + ii) * ldc + r0 + 4 * q + p] * gc[q];
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      const float x = (r0 + ii == col ? 1.f : 0.f) - s;
      if ((ii & 3) == p) gc[ii >> 2] = x;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) sGT[(r0 + 4 * q + p) * ldc + col] = gc[q];
    for (int i = p; i < r0; i += 4) sGT[i * ldc + col] = 0.f;
  }
  __syncthreads();
  for (int d = 1; d < 64 / kB; ++d) {
    const int j = w, i = j + d;  // warp w < 4 - d: block (i, j)
    if (i < 64 / kB) {
      float acc[2][4] = {};
      mac_tf32x3(acc, sA + i * kB * ldc + j * kB, ldc, sGT + j * kB * ldc + j * kB, ldc, d * kB);
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) sA[(j * kB + frow(e)) * ldc + i * kB + fcol(n, e)] = acc[n][e];
    }
    __syncthreads();
    if (i < 64 / kB) {
      float acc[2][4] = {};
      mac_tf32x3(acc, sGT + i * kB * ldc + i * kB, ldc, sA + j * kB * ldc + i * kB, ldc, kB);
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) sGT[(i * kB + frow(e)) * ldc + j * kB + fcol(n, e)] = -acc[n][e];
    }
    __syncthreads();
  }
}
#endif

}  // namespace cuda
}  // namespace lasp
