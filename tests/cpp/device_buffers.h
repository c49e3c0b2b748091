// Device copies of host vectors for the GoogleTest device cases, and their skip without a device: up() copies a vector
// to a new device buffer, down() copies a device buffer back into a vector; the buffers are freed with the object.
#pragma once
#if defined(LASP_WITH_CUDA)
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <vector>

// In a TEST body: skips the test (with the reason shown) where no CUDA device is present.
#define LASP_SKIP_WITHOUT_CUDA_DEVICE()                                            \
  do {                                                                             \
    int lasp_devices_ = 0;                                                         \
    if (cudaGetDeviceCount(&lasp_devices_) != cudaSuccess || lasp_devices_ == 0) { \
      cudaGetLastError();                                                          \
      GTEST_SKIP() << "no CUDA device";                                            \
    }                                                                              \
  } while (0)

template <typename T>
class DeviceBuffers {
 public:
  DeviceBuffers() = default;
  DeviceBuffers(const DeviceBuffers&) = delete;
  DeviceBuffers& operator=(const DeviceBuffers&) = delete;
  ~DeviceBuffers() {
    for (T* p : ptrs_) cudaFree(p);
  }
  T* up(const std::vector<T>& h) {
    T* p = nullptr;
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&p), h.size() * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
    ptrs_.push_back(p);
    return p;
  }
  void down(std::vector<T>& h, const T* p) {
    EXPECT_EQ(cudaMemcpy(h.data(), p, h.size() * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  }

 private:
  std::vector<T*> ptrs_;
};
#endif
