// Launch set-up asked of the CUDA runtime once per device instead of on every op call: a kernel's
// shared-memory opt-in, its resident blocks per SM, device attributes. (Each of these runtime calls costs
// microseconds of host time; an op call used to make a few dozen of them before its first launch.)
#pragma once
#include <atomic>

#include <cuda_runtime_api.h>

namespace lasp {
namespace cuda {
namespace fast {

constexpr int kMaxDevices = 64;

// One int per device: f() computes it the first time a device asks (a negative result, e.g. an error, is
// returned but not kept, so the next call asks again). Devices past kMaxDevices are never cached.
template <typename F>
int memo_per_device(std::atomic<int> (&slots)[kMaxDevices], F&& f) {
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    dev = -1;
  }
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if (cacheable) {
    const int c = slots[dev].load(std::memory_order_relaxed);
    if (c != 0) return c - 1;  // kept as value + 1 (static storage starts zeroed: "not asked yet")
  }
  const int v = f();
  if (v >= 0 && cacheable) slots[dev].store(v + 1, std::memory_order_relaxed);
  return v;
}

// cudaFuncSetAttribute(Kernel, MaxDynamicSharedMemorySize, smem), once per device. One cache per kernel
// instantiation (Kernel is a template argument: kernels of the same signature do not share it); smem must
// be the same on every call for a given Kernel (each kernel's shared memory is a compile-time size).
template <auto Kernel>
cudaError_t opt_in_smem(size_t smem) {
  static std::atomic<int> done[kMaxDevices];
  cudaError_t err = cudaSuccess;
  memo_per_device(done, [&] {
    err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    return err == cudaSuccess ? 1 : -1;
  });
  return err;
}

// Blocks of Kernel (threads per block, smem bytes) one SM of the current device holds at once, at least 1;
// `fallback` where the runtime cannot say (the launch then reports the real error).
template <auto Kernel>
int resident_blocks(int threads, size_t smem, int fallback) {
  static std::atomic<int> blocks[kMaxDevices];
  const int n = memo_per_device(blocks, [&] {
    int b = 0;
    if (opt_in_smem<Kernel>(smem) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, Kernel, threads, smem) != cudaSuccess) {
      (void)cudaGetLastError();
      return -1;
    }
    return b < 1 ? 1 : b;
  });
  return n < 0 ? fallback : n;
}

// A device attribute of the current device (`fallback` where the runtime cannot say).
template <cudaDeviceAttr Attr>
int device_attribute(int fallback) {
  static std::atomic<int> value[kMaxDevices];
  const int v = memo_per_device(value, [] {
    int dev = 0, x = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&x, Attr, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return -1;
    }
    return x;
  });
  return v < 0 ? fallback : v;
}

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
