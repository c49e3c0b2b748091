// The launch plan (plan.h): which family runs each role, the segment split, the generic kernels' tiles.
#include "plan.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "fast_args.h"
#include "fast_path.h"
#include "launch_cache.h"
#include "lasp_cuda.h"

namespace lasp {
namespace cuda {

namespace {

// The tensor-core family settings (LASP_FWD_KERNEL / LASP_BWD_KERNEL; lasp_cuda.h).
fast::KernelSwitch g_fwd_kernel("LASP_FWD_KERNEL", (int)FwdKernel::Wgmma);
fast::KernelSwitch g_bwd_kernel("LASP_BWD_KERNEL", (int)BwdKernel::Wgmma);

// The tensor-core family of the forward (backward) passes of p on this device under the current setting:
// wgmma where it is asked for, available and takes the head dims, else mma.sync.
Family tc_family(const AttnParams& p, bool backward) {
  const int want = backward ? g_bwd_kernel.get() : g_fwd_kernel.get();
  return want == 1 && wgmma_available() && fast::wgmma_shape(p) ? Family::Wgmma : Family::Mma;
}

struct DevInfo {
  int sms = 132;
  size_t smem_optin = 48 * 1024;
};

DevInfo dev_info() {  // asked of the runtime once per device (launch_cache.h)
  DevInfo d;
  const int sms = fast::device_attribute<cudaDevAttrMultiProcessorCount>(0);
  const int optin = fast::device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(0);
  if (sms > 0) d.sms = sms;
  if (optin > 0) d.smem_optin = (size_t)optin;
  return d;
}

// Shared-memory elements of the chunk decay weights (generic_kernels.cuh, ChunkDecay).
int decay_elems(int C) { return 4 * C + 2; }

// Chunk C and column tile of a generic kernel whose shared memory is smem(C, tile) elements.
template <typename F>
bool pick_tile(F smem, int full, size_t esz, size_t limit, int& C, int& tile, size_t& bytes) {
  for (int c : {32, 16, 8}) {
    for (int t : {64, 32, 16, 8, 4, 2, 1}) {
      const int tt = std::min(t, full);
      const size_t b = (size_t)smem(c, tt) * esz;
      if (b <= limit) {
        C = c;
        tile = tt;
        bytes = b;
        return true;
      }
    }
  }
  return false;
}

// The extra time of a segment split, relative to the main pass it cuts: phase 1 (the local states of every
// segment) and the scan of the segments' states, which the unsplit pass does not run.
constexpr double kSplitCost = 0.35;
// A block's start (its state loaded, its pipeline filled), in chunk steps.
constexpr double kBlockStart = 1.0;
// The most segments the search tries per (b, h) (more where the slots hold more blocks than B * H).
constexpr int64_t kMaxSegments = 16;
// The share of a split backward's time that the forward's kept segment states save (its phase 1: about
// 0.17 of 3.6 ms at (2, 80, 16384, 128, 64) with gates on one H100).
constexpr double kKeptGain = 0.05;

// A forced segment count (LASP_FWD_SEGMENTS / LASP_BWD_SEGMENTS = a positive integer; unset, empty or
// "auto": the plan's own choice, 0), read at first use; for measuring the split (benchmarks/bench_split.py).
int segments_from_env(const char* var) {
  const char* env = std::getenv(var);
  if (!env || !*env || std::strcmp(env, "auto") == 0) return 0;
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);
  if (end && *end == '\0' && n >= 1 && n <= 1 << 20) return (int)n;
  std::fprintf(stderr, "lasp: %s must be \"auto\" or a positive integer (got \"%s\"); using \"auto\"\n", var, env);
  return 0;
}
int forced_segments(bool backward) {
  static const int fwd = segments_from_env("LASP_FWD_SEGMENTS");
  static const int bwd = segments_from_env("LASP_BWD_SEGMENTS");
  return backward ? bwd : fwd;
}

}  // namespace

// segments_for (plan.h): the model and the measurements behind it are there.
int64_t segments_for(int64_t pairs, int64_t slots, int64_t chunks, bool fill_waves, int64_t kept) {
  pairs = std::max<int64_t>(pairs, 1);
  slots = std::max<int64_t>(slots, 1);
  chunks = std::max<int64_t>(chunks, 1);
  const int64_t want = slots / pairs;
  auto waves = [&](int64_t s) { return (double)((pairs * s + slots - 1) / slots); };  // of s segments' blocks
  int64_t ns = 1;
  if (fill_waves) {
    auto time = [&](int64_t s) {
      const double steps = (double)((chunks + s - 1) / s) + kBlockStart;
      return waves(s) * steps * (s > 1 ? 1.0 + kSplitCost : 1.0) * (kept > 1 && s == kept ? 1.0 - kKeptGain : 1.0);
    };
    double best = time(1);
    const int64_t most = std::min<int64_t>(std::max<int64_t>(kMaxSegments, want), chunks);
    for (int64_t s = 2; s <= most; ++s) {
      const double t = time(s);
      if (t < best * (1.0 - 1e-9)) {
        best = t;
        ns = s;
      }
    }
  } else if (want >= 1) {
    ns = std::min<int64_t>(want, chunks);
  } else {
    double best = waves(1);
    for (int64_t s = 2; s <= std::min<int64_t>(8, chunks); ++s) {
      const double t = waves(s) / (double)s * (1.0 + kSplitCost);
      if (t < best - 1e-9) {
        best = t;
        ns = s;
      }
    }
  }
  return ns;
}

namespace {

// Whether the main pass of p fills the waves (segments_for): per-token gates (gate mode 1) on wgmma; document
// starts alone (mode 2) and everything else keep the default rule.
bool fills_waves(Family main, const AttnParams& p) { return main == Family::Wgmma && p.g != nullptr && !p.g_resets; }

// The plan's segments: forced (LASP_FWD_SEGMENTS / LASP_BWD_SEGMENTS) or segments_for, in whole 64-token chunks.
void split_segments(const AttnParams& p, int blocks_per_segment, int sms, int& nseg, int& seglen,
                    int blocks_per_sm, bool backward, bool fill_waves) {
  const int64_t nch64 = std::max<int64_t>((p.N + 63) / 64, 1);
  int64_t ns = forced_segments(backward);
  if (ns > 0) {
    ns = std::min<int64_t>(ns, nch64);
  } else {
    ns = segments_for(p.B * p.H * (int64_t)blocks_per_segment, blocks_per_sm * (int64_t)sms, nch64, fill_waves,
                      backward ? p.kept_nseg : 0);
  }
  if (ns <= 1) {
    nseg = 1;
    seglen = (int)p.N;
    return;
  }
  const int64_t chunks_per = (nch64 + ns - 1) / ns;
  seglen = (int)(chunks_per * 64);
  nseg = (int)((p.N + seglen - 1) / seglen);
}

// The tensor-core family of the main pass of one direction, or Generic where it cannot take p: the dtype,
// head dims and views (mode -1; mode 1 assumes them, mode 0 refuses) and the kernel's shared memory.
Family main_family(const AttnParams& p, int mode, bool backward, const DevInfo& di) {
  const Family tc = tc_family(p, backward);
  if (tc == Family::Wgmma) {
    // every head map; per-token gates too, the backward only without an outgoing-state gradient, which is
    // how the driver always calls it with gates (it adds G's terms itself, attention.cpp): with G inside,
    // dg would read G's terms through the 16-bit state copy and lose them where dg is small
    if (p.g && backward && !(p.no_state_grad && p.grad_state_out == nullptr)) return Family::Generic;
  } else if (p.g) {  // mma.sync: every head map, no gates
    return Family::Generic;
  }
  const bool views = mode < 0 ? (backward ? fast::bwd_supported(p) : fast::fwd_supported(p)) : mode >= 1;
  if (!views) return Family::Generic;
  const bool wg = tc == Family::Wgmma;
  const size_t smem = backward ? (wg ? fast::wgmma_bwd_smem_bytes(p) : fast::mma_bwd_smem_bytes(p))
                               : (wg ? fast::wgmma_fwd_smem_bytes(p) : fast::mma_fwd_smem_bytes(p));
  return smem <= di.smem_optin ? tc : Family::Generic;
}

// Phase 1 of one direction (reverse: M from q, dout; else L from k, v): a tensor-core family where its
// views allow, whatever the main pass takes; the generic kernel's tile in pl.
bool plan_local(const AttnParams& p, bool reverse, const DevInfo& di, Plan& pl, Family& family) {
  // every head map; per-token gates on the wgmma state kernel only
  family = fast::local_supported(p, reverse) ? tc_family(p, reverse) : Family::Generic;
  if (p.g && family != Family::Wgmma) family = Family::Generic;
  const int D = (int)p.D;
  auto sm_loc = [&](int C, int t) { return C * (D + 1) + C * t + D * t + decay_elems(C); };
  return pick_tile(sm_loc, (int)p.E, acc_size(p.dtype), di.smem_optin, pl.C_loc, pl.t_loc, pl.sm_loc);
}

}  // namespace

const char* family_name(Family f) {
  switch (f) {
    case Family::Wgmma: return "wgmma";
    case Family::Mma: return "mma";
    case Family::Generic: break;
  }
  return "generic";
}

void set_fwd_kernel(FwdKernel which) { g_fwd_kernel.set((int)which); }
FwdKernel fwd_kernel() { return static_cast<FwdKernel>(g_fwd_kernel.get()); }
void set_bwd_kernel(BwdKernel which) { g_bwd_kernel.set((int)which); }
BwdKernel bwd_kernel() { return static_cast<BwdKernel>(g_bwd_kernel.get()); }

bool wgmma_available() {
#if defined(LASP_HAVE_SM90A)
  // A device's capability never changes: the driver is asked once per device, not on every call.
  return fast::device_attribute<cudaDevAttrComputeCapabilityMajor>(0) == 9 &&
         fast::device_attribute<cudaDevAttrComputeCapabilityMinor>(0) == 0;
#else
  return false;
#endif
}

Plan plan_fwd(const AttnParams& p, int mode) {
  Plan pl;
  const DevInfo di = dev_info();
  const size_t esz = acc_size(p.dtype);
  const int D = (int)p.D, E = (int)p.E;
  // The tensor-core kernels need their shared memory (about 106 KB at D = 128): smaller GPUs take the
  // generic kernels.
  pl.main = main_family(p, mode, false, di);
  int tiles = 1, blocks_per_sm = 2;
  if (pl.main != Family::Generic) {
    tiles = fast::fwd_tiles(p);
    blocks_per_sm = pl.main == Family::Wgmma ? fast::wgmma_fwd_blocks_per_sm(p) : fast::mma_fwd_blocks_per_sm(p);
  } else {
    auto sm_main = [&](int C, int t) { return 2 * C * (D + 1) + C * t + C * C + D * t + decay_elems(C); };
    if (!pick_tile(sm_main, E, esz, di.smem_optin, pl.C_main, pl.t_main, pl.sm_main)) return pl;
    tiles = (E + pl.t_main - 1) / pl.t_main;
  }
  split_segments(p, tiles, di.sms, pl.nseg, pl.seglen, blocks_per_sm, false, fills_waves(pl.main, p));
  if (!plan_local(p, false, di, pl, pl.local)) return pl;
  pl.local_fwd = pl.local;
  if (pl.nseg > 1) {
    pl.ws_states = align256((size_t)p.B * p.H * pl.nseg * D * E * esz);
    pl.ws_gates = align256((size_t)p.B * p.H * pl.nseg * esz);
  }
  pl.ok = true;
  return pl;
}

Plan plan_bwd(const AttnParams& p, int mode) {
  Plan pl;
  const DevInfo di = dev_info();
  const size_t esz = acc_size(p.dtype);
  const int D = (int)p.D, E = (int)p.E;
  // About 176 KB of shared memory at D = E = 128 (fits sm_90; not sm_80's 163 KB): else the generic kernels.
  pl.main = main_family(p, mode, true, di);
  if (pl.main != Family::Generic) {
    split_segments(p, 1, di.sms, pl.nseg, pl.seglen,
                   pl.main == Family::Wgmma ? fast::wgmma_bwd_blocks_per_sm(p) : fast::mma_bwd_blocks_per_sm(p), true,
                   fills_waves(pl.main, p));
  } else {
    // with gates also q / k columns, the chunk's dg sums and G's rows
    const bool dg = p.g != nullptr;
    auto sm_dqdk = [&](int C, int t) {
      return 2 * C * (E + 1) + C * (t + 1) + C * C + t * E + decay_elems(C) + (dg ? C * (t + 1) + 2 * C + t * E : 0);
    };
    auto sm_dv = [&](int C, int t) { return 2 * C * (D + 1) + C * t + C * C + D * t + decay_elems(C); };
    if (!pick_tile(sm_dqdk, D, esz, di.smem_optin, pl.C_main, pl.t_main, pl.sm_main)) return pl;
    if (!pick_tile(sm_dv, E, esz, di.smem_optin, pl.C_dv, pl.t_dv, pl.sm_dv)) return pl;
    const int tiles = (D + pl.t_main - 1) / pl.t_main;
    split_segments(p, tiles, di.sms, pl.nseg, pl.seglen, 2, true, false);
  }
  // M and the forward's L share the generic phase-1 tile (same shared-memory formula).
  if (!plan_local(p, true, di, pl, pl.local) || !plan_local(p, false, di, pl, pl.local_fwd)) return pl;
  if (pl.nseg > 1) {
    pl.ws_states = align256((size_t)p.B * p.H * pl.nseg * D * E * esz);
    pl.ws_gates = align256((size_t)p.B * p.H * pl.nseg * esz);
  }
  // per-output-head dq, dk, dv: in the accumulation type for the generic kernels, in the 16-bit input
  // dtype for the tensor-core ones (written by their usual stores; lasp_cuda.cu sums them in fp32)
  if (p.Hq != p.H || p.Hkv != p.H || p.Hv != p.H) {
    pl.heads_f32 = pl.main == Family::Wgmma && !p.deterministic;
    if (pl.heads_f32) {  // fp32 over the shared heads only
      pl.ws_heads = heads_f32_bytes(p, 0) + heads_f32_bytes(p, 1) + heads_f32_bytes(p, 2);
    } else {
      pl.ws_heads = align256((size_t)p.B * p.H * p.N * (2 * D + E) * (pl.main == Family::Generic ? esz : 2));
    }
  }
  const bool wants_dg = p.g && !p.g_resets;  // document starts alone take no dg (lasp_params.h)
  if (wants_dg) pl.ws_dg = align256((size_t)p.B * p.H * p.N * esz);
  if (wants_dg && pl.main == Family::Wgmma) {
    const size_t nct = (size_t)(p.N + 63) / 64;
    // at least one state, so that a row of single-chunk segments still takes the chunk sums' path
    const size_t slots = std::max(1, fast::chunk_state_slots(pl.seglen));
    pl.ws_chunk_states = align256((size_t)p.B * p.H * pl.nseg * slots * D * E * 2);
    pl.ws_chunk_sums = align256((size_t)p.B * p.H * nct * sizeof(float));
  }
  pl.ok = true;
  return pl;
}

}  // namespace cuda
}  // namespace lasp
