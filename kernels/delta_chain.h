// The chain of states of the gated delta rule's chunked form (csrc/delta.h states it), as a block program
// that runs as a CUDA kernel (delta_kernels.cu) and, with the same code, on the host (tests/cpp: each phase
// run for every thread in turn, which is what the block's threads compute between its barriers). Torch-free.
//
// Per (b, h) and chunk j, from S = S0:
//   Sstore[j] = S;   X[j] = A[j] + bsign * Bm[j] S;   S = p[j] S + csign * Cm[j] X[j] + R[j]
// The columns of S are independent: one block takes a tile of kChainCols columns of one (b, h); its state
// tile (D x kChainCols) and X tile (C x kChainCols) live in shared memory. Thread t works on column
// t % kChainCols and on the rows r with r % kChainRows == t / kChainCols; the rows of Bm and Cm a warp reads
// are the same for its 32 threads (one broadcast), the state columns consecutive (no bank conflicts).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LASP_CHAIN_HD __host__ __device__ __forceinline__
#define LASP_CHAIN_UNROLL _Pragma("unroll")
#else
#define LASP_CHAIN_HD inline
#define LASP_CHAIN_UNROLL
#endif

namespace lasp {
namespace cuda {

constexpr int kChainCols = 32;     // state columns per block (one warp's width)
constexpr int kChainThreads = 256;
constexpr int kChainRows = kChainThreads / kChainCols;

// Contiguous row-major arrays; BH = B * H. A and R may be null (zero).
template <typename T>
struct ChainArgs {
  int64_t BH = 0, nc = 0;
  int C = 0, D = 0, W = 0;
  const T* A = nullptr;   // (BH, nc, C, W)
  const T* Bm = nullptr;  // (BH, nc, C, D)
  const T* Cm = nullptr;  // (BH, nc, D, C)
  const T* p = nullptr;   // (BH, nc)
  const T* R = nullptr;   // (BH, nc, D, W)
  const T* S0 = nullptr;  // (BH, D, W)
  T* Sstore = nullptr;    // (BH, nc, D, W)
  T* X = nullptr;         // (BH, nc, C, W)
  T* Sfin = nullptr;      // (BH, D, W)
  T bsign = 1, csign = 1;
  bool reverse = false;
};

// Shared memory of one block: the state tile and the X tile.
template <typename T>
LASP_CHAIN_HD size_t chain_smem_bytes(int C, int D) {
  return sizeof(T) * (size_t)(D + C) * kChainCols;
}

// The program of block (bh, column tile tile) on shared memory `smem` (chain_smem_bytes). ex.threads(f)
// runs f(t) for each thread t of the block; ex.sync() is the block's barrier.
template <typename T, typename Exec>
LASP_CHAIN_HD void chain_block(const ChainArgs<T>& a, int64_t bh, int tile, T* smem, Exec& ex) {
  const int C = a.C, D = a.D, W = a.W;
  const int w0 = tile * kChainCols;
  const int cols = W - w0 < kChainCols ? W - w0 : kChainCols;
  T* sS = smem;                            // (D, kChainCols)
  T* sX = smem + (size_t)D * kChainCols;   // (C, kChainCols)
  ex.threads([&](int t) {
    const int w = t % kChainCols;
    for (int d = t / kChainCols; d < D; d += kChainRows)
      sS[d * kChainCols + w] = w < cols ? a.S0[((size_t)bh * D + d) * W + w0 + w] : T(0);
  });
  ex.sync();
  for (int64_t jj = 0; jj < a.nc; ++jj) {
    const int64_t j = a.reverse ? a.nc - 1 - jj : jj;
    const size_t ch = (size_t)bh * a.nc + j;  // this chunk's index in (BH, nc)
    ex.threads([&](int t) {  // store S; X = A + bsign Bm S
      const int w = t % kChainCols;
      if (w >= cols) return;
      for (int d = t / kChainCols; d < D; d += kChainRows)
        a.Sstore[(ch * D + d) * W + w0 + w] = sS[d * kChainCols + w];
      for (int c = t / kChainCols; c < C; c += kChainRows) {
        const T* brow = a.Bm + (ch * C + c) * D;
        T s = 0;
        for (int d = 0; d < D; ++d) s += brow[d] * sS[d * kChainCols + w];
        const size_t xi = (ch * C + c) * W + w0 + w;
        const T x = (a.A ? a.A[xi] : T(0)) + a.bsign * s;
        sX[c * kChainCols + w] = x;
        a.X[xi] = x;
      }
    });
    ex.sync();
    ex.threads([&](int t) {  // S = p S + csign Cm X + R (each thread its own entries of S)
      const int w = t % kChainCols;
      if (w >= cols) return;
      const T pj = a.p[ch];
      for (int d = t / kChainCols; d < D; d += kChainRows) {
        const T* crow = a.Cm + (ch * D + d) * C;
        T s = 0;
        for (int c = 0; c < C; ++c) s += crow[c] * sX[c * kChainCols + w];
        T v = pj * sS[d * kChainCols + w] + a.csign * s;
        if (a.R) v += a.R[(ch * D + d) * W + w0 + w];
        sS[d * kChainCols + w] = v;
      }
    });
    ex.sync();
  }
  ex.threads([&](int t) {
    const int w = t % kChainCols;
    if (w >= cols) return;
    for (int d = t / kChainCols; d < D; d += kChainRows) a.Sfin[((size_t)bh * D + d) * W + w0 + w] = sS[d * kChainCols + w];
  });
  ex.done();
}

// The executors. A block program issues its phases as ex.threads(f) (f(t) for each thread t) and ex.warps(f)
// (f(w) for each warp, warp-level code), separated by ex.sync() (the block's barrier), and ends with ex.done()
// (a helper that issues phases ends with it too, where its caller issues none before its next barrier). On the
// device each thread runs its part of each phase and done() is nothing; tests/cpp/interval_exec.h runs the
// phases between two barriers warp by warp in either order, which done() lets it finish while the
// program's locals are alive.
//
// The block program on the host, one thread after another per phase (tests/cpp), for a block of n threads.
struct HostExec {
  int n = kChainThreads;
  template <typename F>
  void threads(F f) {
    for (int t = 0; t < n; ++t) f(t);
  }
  // f(w) once per warp, for warp-level code (warp_tile.h): the warp's 32 threads at once
  template <typename F>
  void warps(F f) {
    for (int w = 0; w < n / 32; ++w) f(w);
  }
  void sync() {}
  void done() {}
};

#if defined(__CUDACC__)
// The block programs' executor on the device: each thread runs its own part of a phase.
struct DeviceExec {
  template <typename F>
  __device__ __forceinline__ void threads(F f) {
    f(static_cast<int>(threadIdx.x));
  }
  template <typename F>
  __device__ __forceinline__ void warps(F f) {  // every thread of warp w: f(w) (warp_tile.h)
    f(static_cast<int>(threadIdx.x >> 5));
  }
  __device__ __forceinline__ void sync() { __syncthreads(); }
  __device__ __forceinline__ void done() {}
};
#endif

}  // namespace cuda
}  // namespace lasp
