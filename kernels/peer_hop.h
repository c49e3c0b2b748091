// One hop of the LASP state ring through peer memory (the "peer" ring transport). Torch-free.
//
// Each rank owns an inbox per direction in memory its neighbours can write (a symmetric allocation),
// and per slice of the state two flags: `in` (the upstream rank wrote this slice of call `seq`) and
// `ack` (the downstream rank consumed this slice of call `seq`, so it may be written again). One
// kernel does the whole hop, slice by slice in parallel (one block per slice, no grid-wide sync):
//   recv: wait in[b] >= seq; out = gamma * inbox + add (gamma per head from the decay, or per (b, h)
//         given); in_copy = inbox; ack the upstream rank;
//   send: wait for the downstream rank's ack of call seq - 1; write out into its inbox; set its in[b].
// Without recv, out is `add` itself. Flags count calls (wrap-safe), so nothing is ever reset.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace lasp {
namespace cuda {

struct PeerHopParams {
  int64_t numel = 0;        // floats in the state
  int64_t per_head = 0;     // D * E: head h of element i is (i / per_head) % H
  int64_t H = 1;
  const float* decay = nullptr;  // (H,) rates: gamma^n = exp(-decay[h] * n) for this piece; null: 1
  int64_t n = 0;                 // tokens of this piece
  // (numel / per_head) factors, one per (b, h) block of the state (per-token gates: exp of the piece's
  // summed log gates and decay); when set, used instead of decay and n
  const float* gamma = nullptr;
  const float* add = nullptr;    // this rank's contribution (recv) or the state to send (no recv)
  float* in_copy = nullptr;      // recv: the received state (may be null)
  float* out = nullptr;          // recv: gamma * received + add
  // Own memory
  const float* inbox = nullptr;
  const uint32_t* in_flags = nullptr;   // kPeerSlices, written by the upstream rank
  const uint32_t* ack_flags = nullptr;  // kPeerSlices, written by the downstream rank
  // Peer memory
  float* next_inbox = nullptr;          // the downstream rank's inbox
  uint32_t* next_in_flags = nullptr;    // the downstream rank's in flags
  uint32_t* up_ack_flags = nullptr;     // the upstream rank's ack flags
  uint32_t seq = 0;                     // this call's number (1, 2, ...; the same on every rank)
  bool recv = false, send = false;
  uint64_t timeout_ns = 0;              // a wait longer than this gives up
  // Host-mapped word: set to 1 (waiting for the upstream rank) or 2 (for the downstream rank's ack)
  // when a wait gave up; the kernel then returns without sending (or traps, with trap_on_timeout).
  int* timed_out = nullptr;
  bool trap_on_timeout = true;
};

constexpr int kPeerSlices = 128;

// Bytes of one rank's peer buffer for a state of `numel` floats: two inboxes (forward, backward) and
// their flags. inbox(d) at d * inbox_bytes, flags after both: in[d], ack[d] for d = 0, 1.
size_t peer_inbox_bytes(int64_t numel);
size_t peer_buffer_bytes(int64_t numel);

// Fills the recv/send roles and the buffer addresses of `rank`'s hop in direction `dir` (0: towards
// rank + 1, 1: towards rank - 1) of a ring of `world` ranks whose peer buffers this device addresses as
// bases[0..world) (only the neighbours' entries are read).
void peer_hop_addresses(PeerHopParams& p, char* const* bases, int64_t numel, int rank, int world, int dir);

cudaError_t peer_hop(const PeerHopParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace lasp
