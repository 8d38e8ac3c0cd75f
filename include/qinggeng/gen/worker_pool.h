// Runs N worker threads over a shared job and turns the first failure into a clean stop.
#pragma once

#include <functional>

#include "qinggeng/gen/cancellation.h"

namespace qg::gen {

/// \brief Runs `body(worker_index)` on `workers` threads and waits for all of them.
///
/// If a worker throws, `cancel` is raised so the others stop at their next check, every thread
/// is joined, and the first exception is rethrown here.
void run_workers(int workers, const std::function<void(int)>& body, Cancellation& cancel);

}  // namespace qg::gen
