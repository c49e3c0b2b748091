// The gated delta rule's CUDA kernels: the chain of states (delta_chain.h's block program, one block per
// (b, h) and tile of 32 state columns), the chunks' unit-triangular solves (delta_solve.h's, one block of
// 128 threads per chunk and tile of 128 columns), the chunks' fused WY quantities (delta_prep.h's), the
// forward's output (delta_out.h's), the backward's chain inputs, its transposed solve with m^-1 and its
// gradients (delta_bwd.h's), each one block of 256 threads per chunk.
#include <cuda_runtime.h>

#include "delta_chain_api.h"

namespace lasp {
namespace cuda {
namespace {

// The block programs' executor on the device: each thread runs its own part of a phase.
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
__global__ void __launch_bounds__(kSolveCols) solve_kernel(SolveArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  solve_block<T>(a, static_cast<int64_t>(blockIdx.x), static_cast<int>(blockIdx.y), reinterpret_cast<T*>(smem_raw),
                 ex, kSolveCols);
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads) prep_kernel(PrepArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  prep_block<T>(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<T*>(smem_raw), ex);
}

template <typename T>
__global__ void __launch_bounds__(kOutThreads, sizeof(T) == 4 ? 2 : 1) out_kernel(OutArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  out_block<T>(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<T*>(smem_raw), ex);
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads) bwd_kernel(BwdArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  bwd_block<T>(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<T*>(smem_raw), ex);
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads) dr_kernel(DrArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  dr_block<T>(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<T*>(smem_raw), ex);
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads) pro_kernel(ProArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  pro_block<T>(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<T*>(smem_raw), ex);
}

// Launches kernel<<<grid, threads, smem, st>>>(args), opting in to more than 48 KiB of shared memory first.
template <typename A>
cudaError_t launch(void (*kernel)(A), dim3 grid, int threads, size_t smem, cudaStream_t st, const A& args) {
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, threads, smem, st>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_chain(const ChainArgs<T>& a, cudaStream_t st) {
  if (a.BH < 1 || a.C < 1 || a.D < 1 || a.W < 1 || a.nc < 0 || a.BH > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid((unsigned)a.BH, (unsigned)((a.W + kChainCols - 1) / kChainCols));
  return launch(chain_kernel<T>, grid, kChainThreads, chain_smem_bytes<T>(a.C, a.D), st, a);
}

template <typename T>
cudaError_t run_solve(const SolveArgs<T>& a, cudaStream_t st) {
  if (a.chunks < 0 || a.C < 1 || a.W < 1 || a.chunks > INT32_MAX) return cudaErrorInvalidValue;
  if (a.chunks == 0) return cudaSuccess;
  const dim3 grid((unsigned)a.chunks, (unsigned)((a.W + kSolveCols - 1) / kSolveCols));
  return launch(solve_kernel<T>, grid, kSolveCols, solve_smem_bytes<T>(a.C), st, a);
}

template <typename T>
cudaError_t run_prep(const PrepArgs<T>& a, cudaStream_t st) {
  if (!delta_prep_takes(a.C, a.D, a.E, sizeof(T)) || a.chunks < 0 || a.chunks > INT32_MAX) return cudaErrorInvalidValue;
  if (a.chunks == 0) return cudaSuccess;
  return launch(prep_kernel<T>, dim3((unsigned)a.chunks), kPrepThreads, prep_smem_bytes<T>(a.C, a.D, a.E), st, a);
}

template <typename T>
cudaError_t run_out(const OutArgs<T>& a, cudaStream_t st) {
  if (!delta_out_takes(a.C, a.D, a.E, sizeof(T)) || a.chunks < 0 || a.chunks > INT32_MAX) return cudaErrorInvalidValue;
  if (a.chunks == 0) return cudaSuccess;
  return launch(out_kernel<T>, dim3((unsigned)a.chunks), kOutThreads, out_smem_bytes<T>(a.C, a.D), st, a);
}

template <typename T>
cudaError_t run_bwd(const BwdArgs<T>& a, cudaStream_t st) {
  if (!delta_bwd_takes(a.C, a.D, a.E, sizeof(T)) || a.chunks < 0 || a.chunks > INT32_MAX) return cudaErrorInvalidValue;
  if (a.chunks == 0) return cudaSuccess;
  return launch(bwd_kernel<T>, dim3((unsigned)a.chunks), kBwdThreads, bwd_smem_bytes<T>(a.C, a.D, a.E), st, a);
}

template <typename T>
cudaError_t run_dr(const DrArgs<T>& a, cudaStream_t st) {
  if (!delta_dr_takes(a.C, a.D, a.E, sizeof(T)) || a.chunks < 0 || a.chunks > INT32_MAX) return cudaErrorInvalidValue;
  if (a.chunks == 0) return cudaSuccess;
  return launch(dr_kernel<T>, dim3((unsigned)a.chunks), kBwdThreads, dr_smem_bytes<T>(a.C, a.D, a.E), st, a);
}

template <typename T>
cudaError_t run_pro(const ProArgs<T>& a, cudaStream_t st) {
  if (!delta_pro_takes(a.C, a.D, a.E, sizeof(T)) || a.chunks < 0 || a.chunks > INT32_MAX) return cudaErrorInvalidValue;
  if (a.chunks == 0) return cudaSuccess;
  return launch(pro_kernel<T>, dim3((unsigned)a.chunks), kBwdThreads, pro_smem_bytes<T>(a.C, a.D), st, a);
}

}  // namespace

bool delta_pro_takes(int C, int D, int E, size_t elem_size) {
  return C >= 1 && C <= kBwdMaxC && D >= 1 && E >= 1 && ProLayout(C, D).elems * elem_size <= 227 * 1024;
}

cudaError_t delta_pro(const ProArgs<float>& a, cudaStream_t st) { return run_pro(a, st); }
cudaError_t delta_pro(const ProArgs<double>& a, cudaStream_t st) { return run_pro(a, st); }

bool delta_dr_takes(int C, int D, int E, size_t elem_size) {
  return C >= 1 && C <= kBwdMaxC && D >= 1 && E >= 1 && DrLayout(C, D, E).elems * elem_size <= 227 * 1024;
}

cudaError_t delta_dr(const DrArgs<float>& a, cudaStream_t st) { return run_dr(a, st); }
cudaError_t delta_dr(const DrArgs<double>& a, cudaStream_t st) { return run_dr(a, st); }

bool delta_bwd_takes(int C, int D, int E, size_t elem_size) {
  return C >= 1 && C <= kBwdMaxC && D >= 1 && E >= 1 && BwdLayout(C, D, E).elems * elem_size <= 227 * 1024;
}

cudaError_t delta_bwd(const BwdArgs<float>& a, cudaStream_t st) { return run_bwd(a, st); }
cudaError_t delta_bwd(const BwdArgs<double>& a, cudaStream_t st) { return run_bwd(a, st); }

bool delta_out_takes(int C, int D, int E, size_t elem_size) {
  return C >= 1 && C <= kOutMaxC && D >= 1 && E >= 1 && OutLayout(C, D).elems * elem_size <= 227 * 1024;
}

cudaError_t delta_out(const OutArgs<float>& a, cudaStream_t st) { return run_out(a, st); }
cudaError_t delta_out(const OutArgs<double>& a, cudaStream_t st) { return run_out(a, st); }

bool delta_prep_takes(int C, int D, int E, size_t elem_size) {
  return C >= 1 && C <= kPrepMaxC && D >= 1 && E >= 1 && PrepLayout(C, D, E).elems * elem_size <= 227 * 1024;
}

cudaError_t delta_prep(const PrepArgs<float>& a, cudaStream_t st) { return run_prep(a, st); }
cudaError_t delta_prep(const PrepArgs<double>& a, cudaStream_t st) { return run_prep(a, st); }
cudaError_t delta_chain(const ChainArgs<float>& a, cudaStream_t st) { return run_chain(a, st); }
cudaError_t delta_chain(const ChainArgs<double>& a, cudaStream_t st) { return run_chain(a, st); }
cudaError_t delta_solve(const SolveArgs<float>& a, cudaStream_t st) { return run_solve(a, st); }
cudaError_t delta_solve(const SolveArgs<double>& a, cudaStream_t st) { return run_solve(a, st); }

}  // namespace cuda
}  // namespace lasp
