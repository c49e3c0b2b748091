// Register tiles of the gated delta rule's per-chunk block programs (delta_prep.h, delta_out.h, delta_bwd.h), for
// blocks of 256 threads (8 warps) on chunks of at most 64 rows. Torch-free; host and device.
//
// Thread t's tile has the rows r0 .. r0 + 7, r0 = 8 (t / 32): the 8 rows of a warp are the same for its 32
// threads, so their operand reads are broadcasts. Its columns are lane + 32 n (lane = t % 32): consecutive
// across the warp, so their operand reads are coalesced (global memory) or conflict-free (shared memory).
// Rows past the matrix read its last row (clamped) and are not stored.
#pragma once
#include "delta_chain.h"  // LASP_CHAIN_HD

namespace lasp {
namespace cuda {

struct RowTile {
  int r0, lane, rr[8];  // rr: the rows, clamped to rows - 1
  // offset: rows past the first 64 (a matrix of more rows takes several tiles per thread)
  LASP_CHAIN_HD RowTile(int t, int rows, int offset = 0) : r0(offset + (t / 32) * 8), lane(t % 32) {
    for (int r = 0; r < 8; ++r) rr[r] = r0 + r < rows ? r0 + r : rows - 1;
  }
  LASP_CHAIN_HD int col(int base, int n) const { return base + lane + 32 * n; }
};

// acc[r][n] += sum_{k0 <= k < k1} X(row r, k) Y(k, column n) over the tile's 8 x 8 entries at columns
// base + lane + 32 n; Y is not read at columns >= ncols (0).
template <typename T, typename FX, typename FY>
LASP_CHAIN_HD void tile_mac(T (&acc)[8][8], const RowTile& rt, int k0, int k1, int base, int ncols, FX X, FY Y) {
  for (int k = k0; k < k1; ++k) {
    T x[8], y[8];
    for (int r = 0; r < 8; ++r) x[r] = X(rt.rr[r], k);
    for (int n = 0; n < 8; ++n) {
      const int col = rt.col(base, n);
      y[n] = col < ncols ? Y(k, col) : T(0);
    }
    for (int r = 0; r < 8; ++r)
      for (int n = 0; n < 8; ++n) acc[r][n] += x[r] * y[n];
  }
}

// f(row, column, acc[r][n]) for the tile's entries inside rows x ncols.
template <typename T, typename F>
LASP_CHAIN_HD void tile_store(const T (&acc)[8][8], const RowTile& rt, int rows, int base, int ncols, F f) {
  for (int r = 0; r < 8 && rt.r0 + r < rows; ++r)
    for (int n = 0; n < 8; ++n) {
      const int col = rt.col(base, n);
      if (col < ncols) f(rt.r0 + r, col, acc[r][n]);
    }
}

// The C x C product tile of thread t (8 rows x 2 columns, lane and lane + 32): acc[r][n] = sum_{x < K} A(row, x)
// B(column, x), both clamped to C - 1 (C <= 64). A is read by rows (broadcasts), B by the threads' own rows:
// B in shared memory with an odd row length. f(i, j, value) for the entries inside C x C.
template <typename T, typename FA, typename FB, typename F>
LASP_CHAIN_HD void cc_tile(int t, int C, int K, FA A, FB B, F f) {
  const RowTile rt(t, C);
  int cr[2];
  for (int n = 0; n < 2; ++n) cr[n] = rt.lane + 32 * n < C ? rt.lane + 32 * n : C - 1;
  T acc[8][2] = {};
  for (int x = 0; x < K; ++x) {
    T a[8], b[2];
    for (int r = 0; r < 8; ++r) a[r] = A(rt.rr[r], x);
    for (int n = 0; n < 2; ++n) b[n] = B(cr[n], x);
    for (int r = 0; r < 8; ++r)
      for (int n = 0; n < 2; ++n) acc[r][n] += a[r] * b[n];
  }
  for (int r = 0; r < 8; ++r)
    for (int n = 0; n < 2; ++n) {
      const int i = rt.r0 + r, j = rt.lane + 32 * n;
      if (i < C && j < C) f(i, j, acc[r][n]);
    }
}

// The gate gradient's last steps (delta_bwd.h's bwd_finish and the 16-bit gradients kernel), one thread per
// column or row t of a C-row chunk. XG's column t summed from the bottom, in place: XG[i, t] = sum_{i' >= i} XG[i', t].
template <typename T>
LASP_CHAIN_HD void xg_column_suffix(T* xg, int ld, int C, int t) {
  T z = 0;
  for (int i = C - 1; i >= 0; --i) {
    z += xg[i * ld + t];
    xg[i * ld + t] = z;
  }
}

// dg[t] = sum_{i >= t} pre[i] dpre[i] + sum_{j < t} (Z[t, j] + xs[j]), Z: XG after xg_column_suffix. Each weight
// times its gradient, summed over the tokens that weight spans (pre[i]: 0 .. i, Gam[i, j]: j+1 .. i, suf[j]: j+1 ..
// C-1), as sums of the terms themselves.
template <typename T>
LASP_CHAIN_HD T dg_row(const T* pre, const T* dpre, const T* z, int ldz, const T* xs, int C, int t) {
  T xp = 0, zs = 0, xss = 0;
  for (int i = C - 1; i >= t; --i) xp += pre[i] * dpre[i];
  for (int j = 0; j < t; ++j) {
    zs += z[t * ldz + j];
    xss += xs[j];
  }
  return xp + zs + xss;
}

}  // namespace cuda
}  // namespace lasp
