// The launch plan of one call: for each role (phase 1 local states, the main forward, the backward), which
// kernel family runs it, and how each sequence is cut into segments. The one place these choices are made;
// the drivers (lasp_cuda.cu) launch what the plan names. Torch-free.
//
// Families (kernels/DESIGN.md):
//   Wgmma   bf16/fp16, D and E in {64, 128}, sm_90a builds on compute capability 9.0 (TMA + warpgroup MMAs);
//   Mma     bf16/fp16, D and E multiples of 8 up to 128 (padded to {64, 128} inside the kernels) on sm_80
//           and later (mma.sync): on sm_90 the dims wgmma does not take, or every dim when
//           LASP_FWD_KERNEL / LASP_BWD_KERNEL asks for it;
//   Generic every dtype (fp32 and fp64 always) and head dims 1..256 that no tensor-core family takes, and
//           strided views those cannot read (SIMT, shared-memory tiles).
// Head maps: both tensor-core families take every map (MHA, GQA, MQA, GVA, three head counts); where q,
// k or v heads are shared, the backward writes those gradients per output head (tensor-core families: in
// the 16-bit input dtype; generic kernels: in the accumulation type) and sums them in fp32
// (Plan::ws_heads), except on wgmma without p.deterministic, which adds them into fp32 sums as it goes
// (Plan::heads_f32). Per-token gates (AttnParams::g) run every role on wgmma where it takes the problem
// (the backward only with no_state_grad: no outgoing-state gradient), else on the generic kernels.
// Head dims above 128 (bf16/fp16, multiples of 8) are cut by the drivers into blocks of at most 128, each
// planned on its own (lasp_cuda.cu, "head-dim blocks").
#pragma once
#include <cstddef>
#include <cstdint>

#include "lasp_params.h"

namespace lasp {
namespace cuda {

enum class Family : int { Generic = 0, Mma = 1, Wgmma = 2 };

// Workspace regions start on 256-byte boundaries.
inline size_t align256(size_t x) { return (x + 255) / 256 * 256; }
const char* family_name(Family f);  // "generic", "mma", "wgmma"

struct Plan {
  bool ok = false;
  // forward: o (main) and L (local); backward: dq, dk, dv (main), M (local) and the forward's segment
  // states it recomputes (local_fwd, as a forward plan's local)
  Family main = Family::Generic, local = Family::Generic, local_fwd = Family::Generic;
  int nseg = 1, seglen = 0;  // segments per (b, h), tokens per segment (the last may be shorter)
  // Generic kernels: chunk, column (forward, dv, local) or row (dq/dk) tile, dynamic shared bytes.
  int C_main = 32, t_main = 64;
  size_t sm_main = 0;
  int C_dv = 32, t_dv = 64;
  size_t sm_dv = 0;
  int C_loc = 32, t_loc = 64;
  size_t sm_loc = 0;
  size_t ws_states = 0;  // bytes of one (B, H, nseg, D, E) state array (0 when nseg == 1)
  // bytes of the per-output-head dq, dk, dv (0 where each q, k and v head has one output head): the
  // tensor-core families write the parts of the shared heads in the 16-bit input dtype, the generic
  // kernels all three in the accumulation type
  size_t ws_heads = 0;
  // wgmma backward where heads are shared and p.deterministic is not set: ws_heads holds instead fp32 sums
  // over the shared heads themselves (dq (B, Hq, N, D) where Hq < H, dk (B, Hkv, N, D) where Hkv < H, dv
  // (B, Hv, N, E) where Hv < H, each region 256-byte aligned, in that order), which the kernel adds each
  // output head's part into (fast_path.h, HeadWs::f32)
  bool heads_f32 = false;
  size_t ws_gates = 0;   // the segments' log-gate sums, (B, H, nseg) (0 when nseg == 1)
  size_t ws_dg = 0;      // backward with gates: the per-token (s, G) pair sums, (B, H, N)
  // wgmma backward with gates: the 16-bit state after every even 64-token chunk of a segment before its
  // last, (B, H, nseg, chunk_state_slots(seglen), D, E), and the fp32 <S, R> at each chunk's end,
  // (B, H, ceil(N / 64)) (wgmma_bwd.cu: dg's terms across chunks)
  size_t ws_chunk_states = 0, ws_chunk_sums = 0;
  // Layouts: forward [S | gate sums], backward [S | G | heads | gate sums | dg pairs | chunk states | chunk sums].
  size_t fwd_bytes() const { return ws_states + ws_gates; }
  size_t bwd_bytes() const { return 2 * ws_states + ws_heads + ws_gates + ws_dg + ws_chunk_states + ws_chunk_sums; }
  size_t bwd_gates_offset() const { return 2 * ws_states + ws_heads; }
  size_t bwd_chunks_offset() const { return 2 * ws_states + ws_heads + ws_gates + ws_dg; }
};

// Plan::heads_f32: the bytes of region i (0: dq, 1: dk, 2: dv) of ws_heads, the fp32 sum over the q, k or v
// heads when they are shared (256-byte aligned), else 0. The plan sizes ws_heads and the driver carves it by this.
inline size_t heads_f32_bytes(const AttnParams& p, int i) {
  const int64_t heads[3] = {p.Hq, p.Hkv, p.Hv}, cols[3] = {p.D, p.D, p.E};
  return heads[i] != p.H ? align256((size_t)p.B * p.N * sizeof(float) * heads[i] * cols[i]) : 0;
}

// Segments per (b, h) sequence of `chunks` 64-token chunks, for a grid of `pairs` blocks per segment (B * H
// * column tiles) on `slots` resident blocks (blocks per SM * SMs).
//
// By default: where the slots hold the blocks, as many segments as fill them (floor(slots / blocks));
// where they do not, the split whose waves, each 1 / s as long, plus the split's own cost, take least
// time (s <= 8; 160 blocks on 132 slots run two waves of work for 1.2).
//
// fill_waves (the gated forward and backward on wgmma): the least modelled time over every s, in chunk
// steps of one block: the waves of blocks, ceil(pairs s / slots), each as long as a segment's chunks plus
// kBlockStart, times 1 + kSplitCost where s > 1. A wave counts whole even when part full: with two blocks
// per SM (the forward at D = 128), the SMs that hold two set its length, so 160 blocks on 132 SMs of two
// slots each take as long as 264 would, and more, shorter segments pay even where the blocks fit the
// slots; with one (the backward), idle SMs count. Measured on one H100, bf16, with gates, ms:
//   forward, (2, 80, 16384, D 128, E 64), one q/k head: 1.18 unsplit, 1.00 in 8 segments (chosen);
//   forward, (2, 24, 16384, 128): 0.73 in 2 (the default rule), 0.64 in 8 (chosen);
//   forward, (4, 32, 8192, 128): 0.57 unsplit (chosen), 0.71 in 2;
//   forward + backward, (2, 24, 16384, 128), backward in 1 / 2 (default) / 4 / 8 (chosen) segments:
//   3.57 / 2.46 / 2.60 / 2.26;
//   forward + backward, (1, 80, 16384, 128, 64), one q/k head, backward in 1 (default) / 4 / 8 (chosen) /
//   13 segments: 3.17 / 2.72 / 2.63 / 2.55.
// Without gates the main passes are cheaper against the split's phase 1 and the default rule stays:
// forward (2, 80, 16384, 128, 64) 0.60 unsplit, 0.71 in 8; forward + backward (2, 24, 16384, 128) 1.41
// with the backward in 2, 1.74 in 4.
//
// kept > 1 (fill_waves, a backward whose forward kept its segment states in `kept` segments): that count
// skips phase 1 of the split, and its time counts 1 - kKeptGain of the model's. On one H100, (2, 80, 16384,
// 128, 64), one q/k head, the forward in 8 segments: forward + backward 4.80 ms with the backward in 4 (the
// model without the kept states), 4.67 in 8.
int64_t segments_for(int64_t pairs, int64_t slots, int64_t chunks, bool fill_waves, int64_t kept = 0);

// mode: -1 decide from p (shapes, dtype, strides, pointer alignment, device), 0 generic kernels only,
// 1 tensor-core kernels for the main pass, the views assumed to suit them (workspace sizing asks every
// mode, see *_workspace_bytes; the head-dim blocks of lasp_cuda.cu check their views once for the call).
// Mode 1 falls back to the generic kernels where the kernel's shared memory does not fit.
Plan plan_fwd(const AttnParams& p, int mode = -1);
Plan plan_bwd(const AttnParams& p, int mode = -1);

}  // namespace cuda
}  // namespace lasp
