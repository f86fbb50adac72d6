// Helpers shared by the CUDA files of the op (knn_search_cuda.cu, knn_aggregate_cuda.cu): the
// warp's constants and the devices' attributes.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <mutex>
#include <utility>
#include <vector>

namespace neusdf {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// What the launches need to know of a device, read for every visible device once per process
// (no CUDA call per op call).
struct DeviceFacts {
  int multiprocessors;
  int major;  // compute capability
};

inline const DeviceFacts& device_facts(c10::DeviceIndex device) {
  static std::once_flag once;
  static std::vector<DeviceFacts> facts;
  std::call_once(once, [] {
    std::vector<DeviceFacts> read(c10::cuda::device_count());
    for (size_t d = 0; d < read.size(); ++d) {
      const int index = static_cast<int>(d);
      C10_CUDA_CHECK(
          cudaDeviceGetAttribute(&read[d].multiprocessors, cudaDevAttrMultiProcessorCount, index));
      C10_CUDA_CHECK(
          cudaDeviceGetAttribute(&read[d].major, cudaDevAttrComputeCapabilityMajor, index));
    }
    facts = std::move(read);  // only after every query succeeded (a throw lets a later call retry)
  });
  return facts.at(device);
}

}  // namespace neusdf
