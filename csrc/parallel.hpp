// A minimal std::thread work-sharing loop for the GIL-free hot loops of unlearn_fast._C.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace unlearn_fast {

// 0 means "all hardware threads"; hardware_concurrency() may itself report 0 when unknown.
inline int resolve_threads(int64_t requested) {
  if (requested > 0) return static_cast<int>(requested);
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// Calls fn(worker, begin, end) over [0, n) in blocks of `grain`, handed out through an atomic counter
// so that uneven items (documents of very different lengths) still balance across threads.
// `worker` is in [0, threads) and lets callers keep per-thread scratch buffers without locking.
// The first exception thrown by any worker is rethrown on the calling thread after all have joined.
template <typename Fn>
void parallel_for(int64_t n, int threads, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t blocks = (n + grain - 1) / grain;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks)));
  if (threads == 1) {
    fn(0, int64_t{0}, n);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&](int worker) {
    try {
      for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) {
        fn(worker, b * grain, std::min(n, (b + 1) * grain));
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(blocks);  // the others stop at their next block
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace unlearn_fast
