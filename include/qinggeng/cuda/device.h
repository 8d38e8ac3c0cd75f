// CUDA device discovery and the checked-call helper every CUDA source uses. Only available
// in builds with QG_WITH_CUDA; the functions never throw when no driver or device exists.
#pragma once

#include <string>

namespace qg::cuda {

/// \brief Number of usable CUDA devices (0 when there is no driver or no device).
int device_count();

/// \brief "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)" style description of a device.
std::string device_description(int device);

}  // namespace qg::cuda
