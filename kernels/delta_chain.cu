// The chain of states of the gated delta rule as a CUDA kernel: delta_chain.h's block program, one block per
// (b, h) and tile of 32 state columns.
#include <cuda_runtime.h>

#include "delta_chain.h"
#include "delta_chain_api.h"

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
__global__ void __launch_bounds__(kChainThreads) chain_kernel(ChainArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  chain_block<T>(a, static_cast<int64_t>(blockIdx.x), static_cast<int>(blockIdx.y), reinterpret_cast<T*>(smem_raw),
                 ex);
}

template <typename T>
cudaError_t launch(const ChainArgs<T>& a, cudaStream_t st) {
  if (a.BH < 1 || a.C < 1 || a.D < 1 || a.W < 1 || a.nc < 0 || a.BH > INT32_MAX) return cudaErrorInvalidValue;
  const size_t smem = chain_smem_bytes<T>(a.C, a.D);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(chain_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid((unsigned)a.BH, (unsigned)((a.W + kChainCols - 1) / kChainCols));
  chain_kernel<T><<<grid, kChainThreads, smem, st>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t delta_chain(const ChainArgs<float>& a, cudaStream_t st) { return launch(a, st); }
cudaError_t delta_chain(const ChainArgs<double>& a, cudaStream_t st) { return launch(a, st); }

}  // namespace cuda
}  // namespace lasp
