// Global <-> tile transfers shared by the mma.sync kernels (fast_fwd.cu, fast_bwd.cu): the cp.async load of
// a chunk's rows into shared memory and the store of an mma fragment tile to a strided output.
#pragma once
#include "common.cuh"
#include "fast_args.h"
#include "mma.cuh"

namespace lasp {
namespace cuda {
namespace mma {

// cp.async rows [c0, c0+len) x cols [x0, x0+W) of (b, h) into smem [ROWS][LD]; rows >= len and columns
// >= lim (the true head dim; a multiple of 8) zero-filled, so a kernel compiled for a larger head dim
// computes with zero padding.
template <typename T, int W, int LD, int ROWS = 64>
__device__ __forceinline__ void load_rows(T* sm, const detail::Tv<const T>& v, int b, int h, int64_t c0, int len,
                                          int x0, int lim) {
  constexpr int VPR = W / 8;
  for (int i = threadIdx.x; i < ROWS * VPR; i += blockDim.x) {
    const int r = i / VPR, cv = i - r * VPR;
    const bool ok = r < len && x0 + cv * 8 < lim;
    const T* src = v.p + b * v.sb + h * v.sh + (c0 + (ok ? r : 0)) * v.sn + (ok ? x0 + cv * 8 : 0);
    cp_async16(sm + r * LD + cv * 8, src, ok);
  }
}

// Store a 16 x (8*NT) fp32 fragment tile (rows r0.., cols c0..) to a strided row of type OT; rows >= len
// and columns >= cols (a multiple of 8) are left out.
template <typename OT, int NT>
__device__ __forceinline__ void store_frag(const float (*acc)[4], OT* base, int64_t row_stride, int r0, int c0,
                                           int len, int cols) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int t = r0 + g + hh * 8;
    if (t >= len) continue;
    OT* row = base + t * row_stride + c0 + 2 * tc;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (c0 + nt * 8 >= cols) continue;
      if constexpr (sizeof(OT) == 4) {
        *reinterpret_cast<float2*>(row + nt * 8) = make_float2(acc[nt][2 * hh], acc[nt][2 * hh + 1]);
      } else {
        *reinterpret_cast<uint32_t*>(row + nt * 8) = pack2<OT>(acc[nt][2 * hh], acc[nt][2 * hh + 1]);
      }
    }
  }
}

// Store a 16 x (8*NT) fp32 fragment tile (rows r0.. of the chunk starting at token n0, cols c0..) as the
// head-dim blocks' output o of (b, h) in o.mode (fast_args.h, AccOut); rows >= len and columns >= cols are
// left out. The wgmma accumulators (float[32], 64 columns) have this layout with NT = 8. Every read of the
// running sum is issued before the first store (the compiler cannot move a load above a store that may
// alias it), so a call waits for memory once, not once per pair.
template <typename T, int NT>
__device__ __forceinline__ void store_frag_acc(const float (*f)[4], const fast::AccOut& o, int64_t b, int64_t h,
                                               int64_t n0, int r0, int c0, int len, int cols) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  const int mode = o.mode;
  const bool rd = mode == fast::kAccAdd || mode == fast::kAccFinish;
  float* arow[2];
  T* orow[2];
  float2 cur[2][NT];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t t = n0 + r0 + g + hh * 8;
    arow[hh] = o.acc + b * o.asb + h * o.ash + t * o.asn + c0 + 2 * tc;
    orow[hh] = static_cast<T*>(o.out) + b * o.osb + h * o.osh + t * o.osn + c0 + 2 * tc;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const bool ok = rd && r0 + g + hh * 8 < len && c0 + nt * 8 < cols;
      cur[hh][nt] = ok ? *reinterpret_cast<const float2*>(arow[hh] + nt * 8) : make_float2(0.f, 0.f);
    }
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    if (r0 + g + hh * 8 >= len) continue;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (c0 + nt * 8 >= cols) continue;
      const float2 v = make_float2(f[nt][2 * hh] + cur[hh][nt].x, f[nt][2 * hh + 1] + cur[hh][nt].y);
      if (mode == fast::kAccStore || mode == fast::kAccAdd) {
        *reinterpret_cast<float2*>(arow[hh] + nt * 8) = v;
      } else {
        *reinterpret_cast<uint32_t*>(orow[hh] + nt * 8) = pack2<T>(v.x, v.y);
      }
    }
  }
}

// Ask L2 for the running sum that store_frag_acc<T, NT> with the same arguments will read (Add and Finish
// modes), so that its reads, issued later in the chunk, find it there: a row's 8 * NT fp32 columns span
// NT / 4 lines of 128 B, taken by the row's four threads in turn.
template <int NT>
__device__ __forceinline__ void prefetch_frag_acc(const fast::AccOut& o, int64_t b, int64_t h, int64_t n0, int r0,
                                                  int c0, int len) {
  if (o.mode != fast::kAccAdd && o.mode != fast::kAccFinish) return;
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int t = r0 + g + hh * 8;
    if (t >= len) continue;
    const float* row = o.acc + b * o.asb + h * o.ash + (n0 + t) * o.asn + c0;
    for (int l = tc; l < (NT + 3) / 4; l += 4) prefetch_l2(row + 32 * l);
  }
}

}  // namespace mma
}  // namespace cuda
}  // namespace lasp
