// The gated delta rule's chain of states (delta_chain.h states it) on tensor cores: tf32 mma.sync (m16n8k8,
// fp32 accumulation), for float chains whose inputs came from 16-bit tensors (the op decides; delta_chain_api.h).
// sm_80 and later.
//
// One block of 4 warps per (b, h) and tile of 32 state columns, the tiles of one (b, h) consecutive. The
// state tile S (D x 32) lives in the warps' accumulators (16-row tiles dealt round-robin to the warps) and,
// as the next product's operand, in shared memory; X (C x 32) the same. Per chunk:
//   1. S -> shared memory and Sstore[j];
//   2. X = A[j] + bsign Bm[j] S        (warp w: rows 16w .. 16w + 15 of X, K = D)
//   3. S = p[j] S + csign Cm[j] X + R[j] (each warp its S tiles, K = C)
// Bm[j] and Cm[j] are copied to shared memory with cp.async as they are laid out in global memory (rows or
// columns contiguous): Bm[j+1] while step 3 runs, Cm[j+1] while steps 1-2 of the next chunk run. Three
// barriers per chunk. Padded leading dimensions keep the fragment reads free of bank conflicts.
// ChainTcArgs::wide asks for the wide form (chain_tc_wide_kernel, D <= 128): 8 warps and 128 columns per
// block, so that the column tiles of one (b, h) do not each read every chunk's Bm and Cm again.
#include <cuda_runtime.h>

#include <cstdint>

#include "delta_chain_api.h"
#include "warp_tile.h"  // tf32_bits, tf32_mma

namespace lasp {
namespace cuda {
namespace {

constexpr int kTcCols = 32;    // state columns per block
constexpr int kTcWarps = 4;
constexpr int kTcThreads = 32 * kTcWarps;
constexpr int kTcMaxD = 256;   // accumulators for D / 16 / 4 = 4 tiles of S per warp
constexpr int kTcMaxC = 64;    // one 16-row tile of X per warp
constexpr int kTcLdS = kTcCols + 8;  // (k, n) tiles: 8 k + n hits 32 banks
constexpr int kWideCols = 128;       // the wide form: state columns per block
constexpr int kWideWarps = 8;
constexpr int kWideThreads = 32 * kWideWarps;
constexpr int kWideMaxD = 128;       // one 16-row tile of S per warp
constexpr int kWideLd = kWideCols + 8;

__host__ __device__ inline int round32(int x) { return (x + 31) / 32 * 32; }

// A chunk matrix of R x K (rows = the product's M, columns = its K) in shared memory, in its global layout:
// row-major (columns contiguous: element (m, k) at m * ld + k, ld = 4 mod 32) or column-major (rows
// contiguous: at k * ld + m, ld = 8 mod 32).
struct SmemMat {
  bool rowmajor;
  int ld;
  __host__ __device__ SmemMat(const ChainMat& g, int R, int K) : rowmajor(g.sc == 1), ld(0) {
    ld = rowmajor ? round32(K) + 4 : round32(R) + 8;
  }
  __host__ __device__ int floats(int R, int K) const { return rowmajor ? R * ld : K * ld; }
};

__host__ __device__ inline size_t tc_smem_floats(const ChainTcArgs& a) {
  const SmemMat b(a.Bm, a.C, a.D), c(a.Cm, a.D, a.C);
  return (size_t)b.floats(a.C, a.D) + c.floats(a.D, a.C) + (size_t)(a.D + a.C) * (a.wide ? kWideLd : kTcLdS);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async4(float* s, const float* g) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(s)), "l"(g));
}
__device__ __forceinline__ void cp_async16(float* s, const float* g) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(s)), "l"(g));
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// This thread's entries of the 16-row tile at row0 of chunk ch of m (an operand of W columns, read from column
// w0), in the mma.sync accumulator layout of 4 column blocks of 8: rows row0 + g (+8), columns 8 nt + 2c (+1);
// zeros past `cols` and where m is absent. Loaded ahead of the products that precede their use, so that their
// latency overlaps those products.
__device__ __forceinline__ void load_frag(float (&v)[4][4], const ChainMat& m, int64_t ch, int row0, int w0, int cols) {
  const int l = threadIdx.x & 31, g = l >> 2, c = l & 3;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + g + (e >> 1) * 8, col = nt * 8 + 2 * c + (e & 1);
      v[nt][e] = m.p && col < cols ? m.p[ch * m.sch + r * m.sr + (int64_t)(w0 + col) * m.sc] : 0.f;
    }
}

// Copies chunk ch of g (R x K) into s (layout sm), by 16-byte copies where the contiguous runs allow, with the
// block's NTHR threads.
template <int NTHR = kTcThreads>
__device__ __forceinline__ void load_mat(float* s, const SmemMat& sm, const ChainMat& g, int64_t ch, int R, int K) {
  const float* base = g.p + ch * g.sch;
  const int inner = sm.rowmajor ? K : R, outer = sm.rowmajor ? R : K;
  const int64_t so = sm.rowmajor ? g.sr : g.sc;
  const bool vec = inner % 4 == 0 && so % 4 == 0 && (reinterpret_cast<uintptr_t>(base) & 15) == 0;
  if (vec) {
    const int per = inner / 4;
    for (int i = threadIdx.x; i < outer * per; i += NTHR) {
      const int o = i / per, e = (i % per) * 4;
      cp_async16(s + o * sm.ld + e, base + o * so + e);
    }
  } else {
    for (int i = threadIdx.x; i < outer * inner; i += NTHR) {
      const int o = i / inner, e = i % inner;
      cp_async4(s + o * sm.ld + e, base + o * so + e);
    }
  }
}

// The A fragment (16 x 8) at (m0, k0) of a shared matrix.
__device__ __forceinline__ void frag_a(uint32_t* a, const float* s, const SmemMat& sm, int m0, int k0) {
  const int l = threadIdx.x & 31, g = l >> 2, c = l & 3;
  const int m[4] = {m0 + g, m0 + g + 8, m0 + g, m0 + g + 8}, k[4] = {k0 + c, k0 + c, k0 + c + 4, k0 + c + 4};
#pragma unroll
  for (int i = 0; i < 4; ++i) a[i] = tf32_bits(s[sm.rowmajor ? m[i] * sm.ld + k[i] : k[i] * sm.ld + m[i]]);
}

// acc[nt] (16 x 8 each, nt < 4) += M (16 rows at m0, K columns) x T (K x 32 in shared memory, ld kTcLdS)
__device__ __forceinline__ void tile_product(float (*acc)[4], const float* sM, const SmemMat& sm, int m0, int K,
                                             const float* sT) {
  const int l = threadIdx.x & 31, g = l >> 2, c = l & 3;
  for (int k0 = 0; k0 < K; k0 += 8) {
    uint32_t a[4];
    frag_a(a, sM, sm, m0, k0);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const uint32_t b0 = tf32_bits(sT[(k0 + c) * kTcLdS + nt * 8 + g]);
      const uint32_t b1 = tf32_bits(sT[(k0 + c + 4) * kTcLdS + nt * 8 + g]);
      tf32_mma(acc[nt], a, b0, b1);
    }
  }
}

__global__ void __launch_bounds__(kTcThreads) chain_tc_kernel(ChainTcArgs a) {
  extern __shared__ __align__(16) float smem[];
  const int C = a.C, D = a.D, W = a.W;
  // blocks in (b, h)-major order: the column tiles of one (b, h) run side by side and read each chunk's Bm and
  // Cm from L2 after the first of them brought it in
  const int ntiles = (W + kTcCols - 1) / kTcCols;
  const int64_t bh = blockIdx.x / ntiles;
  const int w0 = (int)(blockIdx.x % ntiles) * kTcCols, cols = min(kTcCols, W - w0);
  const int warp = threadIdx.x >> 5, l = threadIdx.x & 31, g = l >> 2, c = l & 3;
  const SmemMat smB(a.Bm, C, D), smC(a.Cm, D, C);
  float* sB = smem;
  float* sC = sB + smB.floats(C, D);
  float* sS = sC + smC.floats(D, C);
  float* sX = sS + D * kTcLdS;
  const int sTiles = D / 16, xTiles = C / 16;
  // The fragment's entries: rows r0 = 16 t + g and r0 + 8, columns 8 nt + 2c and + 1 (of the tile).
  float accS[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int t = warp + i * kTcWarps;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = t * 16 + g + (e >> 1) * 8, col = nt * 8 + 2 * c + (e & 1);
        accS[i][nt][e] = t < sTiles && col < cols ? a.S0[((size_t)bh * D + r) * W + w0 + col] : 0.f;
      }
  }
  auto chunk_of = [&](int64_t jj) { return bh * a.nc + (a.reverse ? a.nc - 1 - jj : jj); };
  if (a.nc > 0) {
    load_mat(sB, smB, a.Bm, chunk_of(0), C, D);
    commit();
    load_mat(sC, smC, a.Cm, chunk_of(0), D, C);
    commit();
  }
  for (int64_t jj = 0; jj < a.nc; ++jj) {
    const int64_t ch = chunk_of(jj);
    // 1. S -> shared memory and Sstore[j]
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = warp + i * kTcWarps;
      if (t >= sTiles) continue;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = t * 16 + g + (e >> 1) * 8, col = nt * 8 + 2 * c + (e & 1);
          sS[r * kTcLdS + col] = accS[i][nt][e];
          if (col < cols) a.Sstore[((size_t)ch * D + r) * W + w0 + col] = accS[i][nt][e];
        }
    }
    wait_group<1>();
    __syncthreads();
    // 2. X = A + bsign Bm S
    if (warp < xTiles) {
      float av[4][4];  // A's entries first: their loads are in flight while the products run
      load_frag(av, a.A, ch, warp * 16, w0, cols);
      float accX[4][4] = {};
      tile_product(accX, sB, smB, warp * 16, D, sS);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp * 16 + g + (e >> 1) * 8, col = nt * 8 + 2 * c + (e & 1);
          float x = 0.f;
          if (col < cols) {
            x = a.bsign * accX[nt][e] + av[nt][e];
            a.X[((size_t)ch * C + r) * W + w0 + col] = x;
          }
          sX[r * kTcLdS + col] = x;
        }
    }
    wait_group<0>();
    __syncthreads();
    if (jj + 1 < a.nc) load_mat(sB, smB, a.Bm, chunk_of(jj + 1), C, D);
    commit();
    // 3. S = p S + csign Cm X + R
    const float pj = a.p[ch];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = warp + i * kTcWarps;
      if (t >= sTiles) continue;
      float rv[4][4];  // R's entries first, in flight during the products
      load_frag(rv, a.R, ch, t * 16, w0, cols);
      float prod[4][4] = {};
      tile_product(prod, sC, smC, t * 16, C, sX);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + 2 * c + (e & 1);
          const float s = pj * accS[i][nt][e] + a.csign * prod[nt][e] + rv[nt][e];
          accS[i][nt][e] = col < cols ? s : 0.f;
        }
    }
    __syncthreads();
    if (jj + 1 < a.nc) load_mat(sC, smC, a.Cm, chunk_of(jj + 1), D, C);
    commit();
  }
  wait_group<0>();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int t = warp + i * kTcWarps;
    if (t >= sTiles) continue;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = t * 16 + g + (e >> 1) * 8, col = nt * 8 + 2 * c + (e & 1);
        if (col < cols) a.Sfin[((size_t)bh * D + r) * W + w0 + col] = accS[i][nt][e];
      }
  }
}
// acc[nt] (16 x 8 each, nt < NT) += M (16 rows at m0, K columns) x T (K x 8 NT at column n0 of a shared
// matrix of row length LD)
template <int NT, int LD>
__device__ __forceinline__ void tile_product_n(float (*acc)[4], const float* sM, const SmemMat& sm, int m0, int K,
                                               const float* sT, int n0) {
  const int l = threadIdx.x & 31, g = l >> 2, c = l & 3;
  for (int k0 = 0; k0 < K; k0 += 8) {
    uint32_t a[4];
    frag_a(a, sM, sm, m0, k0);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint32_t b0 = tf32_bits(sT[(k0 + c) * LD + n0 + nt * 8 + g]);
      const uint32_t b1 = tf32_bits(sT[(k0 + c + 4) * LD + n0 + nt * 8 + g]);
      tf32_mma(acc[nt], a, b0, b1);
    }
  }
}

// The wide form: one block of 8 warps per (b, h) and tile of 128 state columns (D <= 128), so a chunk's Bm and
// Cm are read once per 128 columns instead of once per 32. Warp w keeps S's row tile w (16 rows x 128
// columns) in its accumulators; X's 16-row tile w % 4, columns 64 (w / 4) .. + 63, is warp w's. Otherwise the
// same three steps, copies and barriers as chain_tc_kernel.
__global__ void __launch_bounds__(kWideThreads) chain_tc_wide_kernel(ChainTcArgs a) {
  extern __shared__ __align__(16) float smem[];
  const int C = a.C, D = a.D, W = a.W;
  const int ntiles = (W + kWideCols - 1) / kWideCols;  // (b, h)-major, as chain_tc_kernel
  const int64_t bh = blockIdx.x / ntiles;
  const int w0 = (int)(blockIdx.x % ntiles) * kWideCols, cols = min(kWideCols, W - w0);
  const int warp = threadIdx.x >> 5, l = threadIdx.x & 31, g = l >> 2, c = l & 3;
  const SmemMat smB(a.Bm, C, D), smC(a.Cm, D, C);
  float* sB = smem;
  float* sC = sB + smB.floats(C, D);
  float* sS = sC + smC.floats(D, C);
  float* sX = sS + D * kWideLd;
  const bool ownS = warp < D / 16;
  const int xt = warp % 4, n0 = (warp / 4) * 64;  // X tile: rows 16 xt, columns n0 .. n0 + 63
  const bool ownX = xt < C / 16;
  float accS[16][4];
#pragma unroll
  for (int nt = 0; nt < 16; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = warp * 16 + g + (e >> 1) * 8, col = nt * 8 + 2 * c + (e & 1);
      accS[nt][e] = ownS && col < cols ? a.S0[((size_t)bh * D + r) * W + w0 + col] : 0.f;
    }
  auto chunk_of = [&](int64_t jj) { return bh * a.nc + (a.reverse ? a.nc - 1 - jj : jj); };
  if (a.nc > 0) {
    load_mat<kWideThreads>(sB, smB, a.Bm, chunk_of(0), C, D);
    commit();
    load_mat<kWideThreads>(sC, smC, a.Cm, chunk_of(0), D, C);
    commit();
  }
  for (int64_t jj = 0; jj < a.nc; ++jj) {
    const int64_t ch = chunk_of(jj);
    // 1. S -> shared memory and Sstore[j]
    if (ownS) {
#pragma unroll
      for (int nt = 0; nt < 16; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp * 16 + g + (e >> 1) * 8, col = nt * 8 + 2 * c + (e & 1);
          sS[r * kWideLd + col] = accS[nt][e];
          if (col < cols) a.Sstore[((size_t)ch * D + r) * W + w0 + col] = accS[nt][e];
        }
    }
    wait_group<1>();
    __syncthreads();
    // 2. X = A + bsign Bm S
    if (ownX) {
      float accX[8][4] = {};
      tile_product_n<8, kWideLd>(accX, sB, smB, xt * 16, D, sS, n0);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = xt * 16 + g + (e >> 1) * 8, col = n0 + nt * 8 + 2 * c + (e & 1);
          float x = 0.f;
          if (col < cols) {
            x = a.bsign * accX[nt][e];
            if (a.A.p) x += a.A.p[ch * a.A.sch + r * a.A.sr + (int64_t)(w0 + col) * a.A.sc];
            a.X[((size_t)ch * C + r) * W + w0 + col] = x;
          }
          sX[r * kWideLd + col] = x;
        }
    }
    wait_group<0>();
    __syncthreads();
    if (jj + 1 < a.nc) load_mat<kWideThreads>(sB, smB, a.Bm, chunk_of(jj + 1), C, D);
    commit();
    // 3. S = p S + csign Cm X + R
    if (ownS) {
      const float pj = a.p[ch];
      float prod[16][4] = {};
      tile_product_n<16, kWideLd>(prod, sC, smC, warp * 16, C, sX, 0);
#pragma unroll
      for (int nt = 0; nt < 16; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp * 16 + g + (e >> 1) * 8, col = nt * 8 + 2 * c + (e & 1);
          float s = pj * accS[nt][e] + a.csign * prod[nt][e];
          if (a.R.p && col < cols) s += a.R.p[ch * a.R.sch + r * a.R.sr + (int64_t)(w0 + col) * a.R.sc];
          accS[nt][e] = col < cols ? s : 0.f;
        }
    }
    __syncthreads();
    if (jj + 1 < a.nc) load_mat<kWideThreads>(sC, smC, a.Cm, chunk_of(jj + 1), D, C);
    commit();
  }
  wait_group<0>();
  if (ownS) {
#pragma unroll
    for (int nt = 0; nt < 16; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = warp * 16 + g + (e >> 1) * 8, col = nt * 8 + 2 * c + (e & 1);
        if (col < cols) a.Sfin[((size_t)bh * D + r) * W + w0 + col] = accS[nt][e];
      }
  }
}
#else
__global__ void chain_tc_kernel(ChainTcArgs) {}  // not launched below sm_80 (delta_chain_tc checks)
__global__ void chain_tc_wide_kernel(ChainTcArgs) {}
#endif

}  // namespace

bool delta_chain_tc_takes(const ChainTcArgs& a) {
  auto layout_ok = [&a](const ChainMat& m) { return (a.nc == 0 || m.p != nullptr) && (m.sr == 1 || m.sc == 1); };
  const int cols = a.wide ? kWideCols : kTcCols;
  return a.C >= 16 && a.C <= kTcMaxC && a.C % 16 == 0 && a.D >= 16 && a.D <= (a.wide ? kWideMaxD : kTcMaxD) &&
         a.D % 16 == 0 && a.W >= 1 && a.BH >= 1 && a.BH * ((a.W + cols - 1) / cols) <= INT32_MAX && a.nc >= 0 &&
         layout_ok(a.Bm) && layout_ok(a.Cm) &&
         tc_smem_floats(a) * sizeof(float) <= 227 * 1024;
}

cudaError_t delta_chain_tc(const ChainTcArgs& a, cudaStream_t st) {
  if (!delta_chain_tc_takes(a)) return cudaErrorInvalidValue;
  int dev = 0, major = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return e;
  if (major < 8) return cudaErrorInvalidDeviceFunction;
  const size_t smem = tc_smem_floats(a) * sizeof(float);
  void (*kernel)(ChainTcArgs) = a.wide ? chain_tc_wide_kernel : chain_tc_kernel;
  if (smem > 48 * 1024) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  const int cols = a.wide ? kWideCols : kTcCols;
  const unsigned blocks = (unsigned)(a.BH * ((a.W + cols - 1) / cols));
  kernel<<<blocks, a.wide ? kWideThreads : kTcThreads, smem, st>>>(a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lasp
