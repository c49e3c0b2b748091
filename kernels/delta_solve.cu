// The gated delta rule's unit-triangular solves as a CUDA kernel: delta_solve.h's block program, one block of
// kSolveCols threads per chunk and tile of columns.
#include <cuda_runtime.h>

#include "delta_chain_api.h"
#include "delta_solve.h"

namespace lasp {
namespace cuda {
namespace {

struct DeviceExec {
  template <typename F>
  __device__ __forceinline__ void threads(F f) {
    f(static_cast<int>(threadIdx.x));
  }
  __device__ __forceinline__ void sync() { __syncthreads(); }
};

template <typename T>
__global__ void __launch_bounds__(kSolveCols) solve_kernel(SolveArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  solve_block<T>(a, static_cast<int64_t>(blockIdx.x), static_cast<int>(blockIdx.y), reinterpret_cast<T*>(smem_raw),
                 ex, kSolveCols);
}

template <typename T>
cudaError_t launch(const SolveArgs<T>& a, cudaStream_t st) {
  if (a.chunks < 0 || a.C < 1 || a.W < 1 || a.chunks > INT32_MAX) return cudaErrorInvalidValue;
  if (a.chunks == 0) return cudaSuccess;
  const size_t smem = solve_smem_bytes<T>(a.C);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(solve_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid((unsigned)a.chunks, (unsigned)((a.W + kSolveCols - 1) / kSolveCols));
  solve_kernel<T><<<grid, kSolveCols, smem, st>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t delta_solve(const SolveArgs<float>& a, cudaStream_t st) { return launch(a, st); }
cudaError_t delta_solve(const SolveArgs<double>& a, cudaStream_t st) { return launch(a, st); }

}  // namespace cuda
}  // namespace lasp
