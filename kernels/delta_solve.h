// The unit-triangular solves of the gated delta rule's chunked form (csrc/delta.cpp): per chunk, X = M^-1 R
// with M unit lower triangular (the WY form's M = I + A), or X = M^-T R (the backward's). One block program
// for the device (delta_kernels.cu) and the host (tests/cpp), as delta_chain.h. Torch-free.
//
// Block (chunk, column tile): M's C x C entries go to shared memory once; then each thread owns one column of
// R and substitutes down it (up it, transposed), x[i] = r[i] - sum_j m[i, j] x[j] over j < i (m[j, i] over
// j > i), keeping its column of X in shared memory: reads of M are broadcasts (every thread the same entry),
// of X conflict-free (consecutive columns). M's diagonal is not read (unit). At the op's chunk size the
// column stays in registers instead (solve_block_fixed).
#pragma once
#include <cstdint>

#include "delta_chain.h"  // LASP_CHAIN_HD, HostExec

namespace lasp {
namespace cuda {

constexpr int kSolveCols = 128;  // columns per block (one per thread)

template <typename T>
struct SolveArgs {
  int64_t chunks = 0;  // B * H * nc
  int C = 0, W = 0;
  const T* M = nullptr;  // (chunks, C, C), unit lower (the diagonal and above are not read)
  const T* R = nullptr;  // (chunks, C, W)
  T* X = nullptr;        // (chunks, C, W)
  bool transpose = false;
};

// The chunk size of the op (csrc/delta.cpp): its solves keep each column in registers (solve_block_fixed).
constexpr int kSolveFixedC = 64;
constexpr int kSolveFixedLd = kSolveFixedC + 4;  // M's rows in shared memory (16-byte aligned)

template <typename T>
LASP_CHAIN_HD size_t solve_smem_bytes(int C) {
  if (C == kSolveFixedC) return sizeof(T) * (size_t)C * kSolveFixedLd;
  return sizeof(T) * ((size_t)C * C + (size_t)C * kSolveCols);
}

// solve_block for C = CC: M goes to shared memory as the rows the substitution reads (M's, or M^T's for the
// transposed solve: both read a contiguous row, by broadcasts), and each thread's column of X stays in
// registers (fully unrolled loops, every index a constant), so a step costs one shared-memory read of M per
// product instead of two.
template <int CC, typename T, typename Exec>
LASP_CHAIN_HD void solve_block_fixed(const SolveArgs<T>& a, int64_t chunk, int tile, T* smem, Exec& ex,
                                     int nthreads) {
  constexpr int ld = CC + 4;
  const int W = a.W;
  T* sM = smem;  // (CC, ld): row i holds the coefficients of x[i]'s step
  const T* M = a.M + (size_t)chunk * CC * CC;
  const bool tr = a.transpose;
  ex.threads([&](int t) {
    for (int i = t; i < CC * CC; i += nthreads) {  // coalesced reads of M; M^T's rows: M's columns
      const int r = i / CC, c = i % CC;
      if (tr) {
        sM[c * ld + r] = M[i];
      } else {
        sM[r * ld + c] = M[i];
      }
    }
  });
  ex.sync();
  ex.threads([&](int t) {
    const int w = tile * kSolveCols + t;
    if (w >= W) return;
    const T* R = a.R + (size_t)chunk * CC * W + w;
    T* X = a.X + (size_t)chunk * CC * W + w;
    T x[CC];
    if (!tr) {  // x[i] = r[i] - sum_{j < i} M[i, j] x[j]
LASP_CHAIN_UNROLL
      for (int i = 0; i < CC; ++i) {
        T s = R[(size_t)i * W];
LASP_CHAIN_UNROLL
        for (int j = 0; j < i; ++j) s -= sM[i * ld + j] * x[j];
        x[i] = s;
        X[(size_t)i * W] = s;
      }
    } else {  // x[i] = r[i] - sum_{j > i} M[j, i] x[j], last row first
LASP_CHAIN_UNROLL
      for (int i = CC - 1; i >= 0; --i) {
        T s = R[(size_t)i * W];
LASP_CHAIN_UNROLL
        for (int j = i + 1; j < CC; ++j) s -= sM[i * ld + j] * x[j];
        x[i] = s;
        X[(size_t)i * W] = s;
      }
    }
  });
  ex.done();
}

// The program of block (chunk, tile) of kSolveCols threads (nthreads) on shared memory `smem`
// (solve_smem_bytes).
template <typename T, typename Exec>
LASP_CHAIN_HD void solve_block(const SolveArgs<T>& a, int64_t chunk, int tile, T* smem, Exec& ex,
                               int nthreads = kSolveCols) {
  if (a.C == kSolveFixedC) {
    solve_block_fixed<kSolveFixedC>(a, chunk, tile, smem, ex, nthreads);
    return;
  }
  const int C = a.C, W = a.W;
  T* sM = smem;                         // (C, C)
  T* sX = smem + (size_t)C * C;         // (C, kSolveCols)
  const T* M = a.M + (size_t)chunk * C * C;
  ex.threads([&](int t) {
    for (int i = t; i < C * C; i += nthreads) sM[i] = M[i];
  });
  ex.sync();
  ex.threads([&](int t) {
    const int w = tile * kSolveCols + t;
    if (w >= W) return;
    const T* R = a.R + (size_t)chunk * C * W + w;
    T* X = a.X + (size_t)chunk * C * W + w;
    for (int ii = 0; ii < C; ++ii) {
      const int i = a.transpose ? C - 1 - ii : ii;
      T s = R[(size_t)i * W];
      if (a.transpose) {
        for (int j = i + 1; j < C; ++j) s -= sM[j * C + i] * sX[j * kSolveCols + t];
      } else {
        for (int j = 0; j < i; ++j) s -= sM[i * C + j] * sX[j * kSolveCols + t];
      }
      sX[i * kSolveCols + t] = s;
      X[(size_t)i * W] = s;
    }
  });
  ex.done();
}

}  // namespace cuda
}  // namespace lasp
