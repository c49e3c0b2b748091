// The unit-triangular solves of the gated delta rule's chunked form (csrc/delta.cpp): per chunk, X = M^-1 R
// with M unit lower triangular (the WY form's M = I + A), or X = M^-T R (the backward's). One block program
// for the device (delta_kernels.cu) and the host (tests/cpp), as delta_chain.h. Torch-free.
//
// Block (chunk, column tile): M's C x C entries go to shared memory once; then each thread owns one column of
// R and substitutes down it (up it, transposed), x[i] = r[i] - sum_j m[i, j] x[j] over j < i (m[j, i] over
// j > i), keeping its column of X in shared memory: reads of M are broadcasts (every thread the same entry),
// of X conflict-free (consecutive columns). M's diagonal is not read (unit).
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

template <typename T>
LASP_CHAIN_HD size_t solve_smem_bytes(int C) {
  return sizeof(T) * ((size_t)C * C + (size_t)C * kSolveCols);
}

// The program of block (chunk, tile) of kSolveCols threads (nthreads) on shared memory `smem`
// (solve_smem_bytes).
template <typename T, typename Exec>
LASP_CHAIN_HD void solve_block(const SolveArgs<T>& a, int64_t chunk, int tile, T* smem, Exec& ex,
                               int nthreads = kSolveCols) {
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
