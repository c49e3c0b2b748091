// The block programs' executor for finding missing barriers on the host (kernels/delta_chain.h states the
// executors' contract: phases, ex.sync(), ex.done()).
//
// Between two barriers each thread of a block runs its parts of the phases in program order, and nothing
// orders one thread's parts against another's. HostExec runs every phase for all threads before the next
// phase, so a phase that reads what another thread wrote in an earlier phase of the same interval (or
// overwrites what another thread still reads there) works on the host and races on the device. IntervalExec
// queues an interval's phases and runs them at its barrier (or at done()) warp by warp, the warps first to
// last or last to first; within a warp, each lane runs all its thread phases up to the next warp phase (where
// the warp's lanes meet: mma.sync is warp-wide) before the next lane starts, lanes first to last or last to
// first. Both are schedules the device may take (threads of a warp are scheduled independently): a program
// whose result differs between them, or that reads shared memory no phase wrote (the tests fill it with
// garbage), has a race, across warps or across the lanes of one. Each host test of a block program runs it
// under both orders.
#pragma once
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace lasp_test {

struct IntervalExec {
  int n;         // threads of the block, a multiple of 32
  bool reverse;  // warps, and the lanes of a thread phase, last first
  IntervalExec(int threads, bool rev) : n(threads), reverse(rev) {}

  template <typename F>
  void threads(F f) {
    pending_.emplace_back(false, std::function<void(int)>(f));
  }
  template <typename F>
  void warps(F f) {
    pending_.emplace_back(true, std::function<void(int)>(f));
  }
  void sync() { run(); }
  void done() { run(); }
  // No phase left queued: the program ended with done() (phases queued past the program's end would refer
  // to its locals after they are gone; the tests check this after each block).
  bool idle() const { return pending_.empty(); }

 private:
  void run() {
    const int nw = n / 32;
    for (int i = 0; i < nw; ++i) {
      const int w = reverse ? nw - 1 - i : i;
      for (size_t p = 0; p < pending_.size();) {
        if (pending_[p].first) {  // a warp phase: the warp's lanes meet there
          pending_[p++].second(w);
          continue;
        }
        size_t q = p;  // thread phases p .. q - 1: each lane runs all of them before the next lane starts
        while (q < pending_.size() && !pending_[q].first) ++q;
        for (int l = 0; l < 32; ++l)
          for (size_t r = p; r < q; ++r) pending_[r].second(w * 32 + (reverse ? 31 - l : l));
        p = q;
      }
    }
    pending_.clear();
  }
  std::vector<std::pair<bool, std::function<void(int)>>> pending_;
};

// The two orders each host test runs a block program under.
constexpr bool kOrders[] = {false, true};

// block(ex, i, smem) for the blocks i = 0 .. n - 1 under IntervalExec{threads, rev}, each on `elems` elements of
// shared memory filled with garbage first; a program that leaves phases queued (no ex.done()) fails the test.
template <typename T, typename F>
void run_blocks(int64_t n, size_t elems, int threads, bool rev, F block) {
  std::vector<T> smem(elems);
  IntervalExec ex{threads, rev};
  for (int64_t i = 0; i < n; ++i) {
    for (auto& e : smem) e = T(1e30);
    block(ex, i, smem.data());
    ASSERT_TRUE(ex.idle()) << "a block program left phases queued: it must end with ex.done()";
  }
}

}  // namespace lasp_test
