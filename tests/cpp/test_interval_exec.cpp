// GoogleTest of the host executor that finds missing barriers (interval_exec.h), on small block programs of
// the delta programs' shape: with the barrier each program gives the same result under both orders; without
// it, the result under one order is wrong (so the delta programs' host tests, which run under both orders,
// fail where a barrier is missing); HostExec runs the racy programs without noticing.
#include <gtest/gtest.h>

#include <vector>

#include "delta_chain.h"  // HostExec
#include "interval_exec.h"

namespace {

constexpr int kThreads = 64;  // two warps

// Each thread writes its own slot, then reads its neighbour's: `across` picks a neighbour in the other warp
// (t + 32), else the next lane of its own warp; `barrier` puts the block's barrier between the two phases.
template <typename Exec>
std::vector<int> neighbour_program(Exec& ex, bool across, bool barrier) {
  std::vector<int> smem(kThreads, -1), out(kThreads, 0);
  ex.threads([&](int t) { smem[t] = 10 * t; });
  if (barrier) ex.sync();
  ex.threads([&](int t) {
    const int u = across ? (t + 32) % kThreads : (t / 32) * 32 + (t % 32 + 1) % 32;
    out[t] = smem[u];
  });
  ex.done();
  return out;
}

// A warp-wide phase (as mma.sync) between the two: the warp's lanes meet there, so a read within the warp
// after it needs no barrier, and one across warps still does.
template <typename Exec>
std::vector<int> warp_phase_program(Exec& ex, bool across) {
  std::vector<int> smem(kThreads, -1), out(kThreads, 0);
  ex.threads([&](int t) { smem[t] = 10 * t; });
  ex.warps([&](int w) { smem[w * 32] += 1; });
  ex.threads([&](int t) {
    const int u = across ? (t + 32) % kThreads : (t / 32) * 32 + (t % 32 + 1) % 32;
    out[t] = smem[u];
  });
  ex.done();
  return out;
}

std::vector<int> expected(bool across, bool warp_phase) {
  std::vector<int> want(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    const int u = across ? (t + 32) % kThreads : (t / 32) * 32 + (t % 32 + 1) % 32;
    want[t] = 10 * u + (warp_phase && u % 32 == 0 ? 1 : 0);
  }
  return want;
}

TEST(IntervalExec, WithBarrierBothOrdersAgree) {
  for (bool across : {false, true})
    for (bool rev : lasp_test::kOrders) {
      lasp_test::IntervalExec ex{kThreads, rev};
      EXPECT_EQ(neighbour_program(ex, across, true), expected(across, false)) << "across " << across << " rev " << rev;
      EXPECT_TRUE(ex.idle());
    }
}

TEST(IntervalExec, MissingBarrierFailsUnderOneOrder) {
  for (bool across : {false, true}) {
    int wrong = 0;
    for (bool rev : lasp_test::kOrders) {
      lasp_test::IntervalExec ex{kThreads, rev};
      wrong += neighbour_program(ex, across, false) != expected(across, false);
    }
    EXPECT_GE(wrong, 1) << (across ? "a read across warps" : "a read across lanes of one warp");
    lasp::cuda::HostExec host{kThreads};
    EXPECT_EQ(neighbour_program(host, across, false), expected(across, false))
        << "HostExec runs each phase for all threads first, so it hides the race";
  }
}

TEST(IntervalExec, WarpPhaseOrdersItsWarpOnly) {
  for (bool rev : lasp_test::kOrders) {
    lasp_test::IntervalExec ex{kThreads, rev};
    EXPECT_EQ(warp_phase_program(ex, false), expected(false, true)) << "rev " << rev;
  }
  int wrong = 0;
  for (bool rev : lasp_test::kOrders) {
    lasp_test::IntervalExec ex{kThreads, rev};
    wrong += warp_phase_program(ex, true) != expected(true, true);
  }
  EXPECT_GE(wrong, 1);
}

}  // namespace
