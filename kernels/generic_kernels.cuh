// Generic (SIMT, any dtype, any head dims 1..256) kernels of the chunked linear attention.
// Every tile lives in shared memory in the accumulation type A; the math is plain FMA.
// These are the reference-quality path: correct for every supported case, not tuned.
//
// The sequence of each (b, h) is split into c.nseg segments of c.seglen tokens, processed by
// different blocks (docs/design.md, "The segment split inside one GPU"):
//   phase 1 (state_local_kernel): local state of each segment (forward: L, backward: M),
//   phase 2 (scan_*_kernel):      prefix combination over segments (S_in of each segment, G of each),
//   phase 3 (*_main kernels):     each segment, chunk by chunk, with its carried state.
// With one segment, phases 1 and 2 are skipped and phase 3 reads state_in / grad_state_out itself.
// Phase 3 also writes the state the call returns: state_out from the last segment's block (its state
// after its last chunk), grad_state_in from the first segment's (its state gradient after its first
// chunk). So phase 1 of fwd / bwd skips the segment whose local state nothing else reads (forward: the
// last, backward: the first); only fwd_local / bwd_local (the ring's local states) need every one.
#pragma once
#include "common.cuh"

namespace lasp {
namespace cuda {
namespace detail {

// Shared-memory elements of a ChunkDecay for chunks of up to C tokens.
__host__ __device__ constexpr int decay_smem_elems(int C) { return 4 * C + 2; }

// The decay weights of one chunk of len tokens (lasp_params.h), with lam[i] the log gate of its token i
// (g[i] - lambda with gates, -lambda without):
//   w(t, s) = exp(sum_{s < i <= t} lam[i])   (s <= t: token s seen at token t)
//   pre(t)  = exp(sum_{i <= t} lam[i])       (the chunk's incoming state seen at token t)
//   suf(s)  = exp(sum_{s < i < len} lam[i])  (token s seen at the chunk's end)
//   tot()   = exp(sum_{i < len} lam[i])      (the chunk's transition)
// Constant decay reads a table of gamma^i filled once. With gates every weight is the exp of a sum over its
// own range, never a difference of prefix sums, so a -inf gate (a reset) gives exact zeros, never inf - inf.
// Lives in decay_smem_elems(C) elements of shared memory; set_chunk syncs the block (call it from every
// thread, after the sync that ends the previous chunk's reads, and sync again before reading).
template <typename A>
struct ChunkDecay {
  A* pw;        // C + 1 powers gamma^i (no gates)
  A* lam;       // C log gates of the chunk (gates)
  A* pre_;      // C
  A* suf_;      // C
  A* tot_;      // 1
  const A* g;   // row (b, h) of the gates, or null
  A lg;         // -lambda_h
  int len;

  __device__ void init(A* base, int C, const Ctx<A>& c, int bh, int h) {
    pw = base;
    lam = pw + C + 1;
    pre_ = lam + C;
    suf_ = pre_ + C;
    tot_ = suf_ + C;
    g = c.g ? c.g + (size_t)bh * c.N : nullptr;
    lg = log_gamma(c, h);
    len = 0;
    if (!g) {
      for (int i = threadIdx.x; i <= C; i += blockDim.x) pw[i] = exp_acc(lg * A(i));
    }
  }
  __device__ void set_chunk(int c0, int n) {
    len = n;
    if (!g) return;
    for (int i = threadIdx.x; i < n; i += blockDim.x) lam[i] = g[c0 + i] + lg;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      A r = 0;
      for (int j = 0; j <= i; ++j) r += lam[j];
      pre_[i] = exp_acc(r);
      if (i == n - 1) *tot_ = exp_acc(r);
      A u = 0;
      for (int j = i + 1; j < n; ++j) u += lam[j];
      suf_[i] = exp_acc(u);
    }
  }
  __device__ __forceinline__ A w(int t, int s) const {
    if (!g) return pw[t - s];
    A r = 0;
    for (int i = s + 1; i <= t; ++i) r += lam[i];
    return exp_acc(r);
  }
  __device__ __forceinline__ A pre(int t) const { return g ? pre_[t] : pw[t + 1]; }
  __device__ __forceinline__ A suf(int s) const { return g ? suf_[s] : pw[len - 1 - s]; }
  __device__ __forceinline__ A tot() const { return g ? *tot_ : pw[len]; }
};

// The transition of the tokens after segment seg of (b, h) to the piece's end: exp(sum of their log gates),
// from the segments' log sums (null: one segment, or no gates: gamma^(tokens after)).
template <typename A>
__device__ __forceinline__ A after_segment(const Ctx<A>& c, const A* seglog, int bh, int h, int seg) {
  if (!c.g) return exp_acc(log_gamma(c, h) * A(c.N - min(c.N, (seg + 1) * c.seglen)));
  if (!seglog) return A(1);
  A r = 0;
  for (int j = seg + 1; j < c.nseg; ++j) r += seglog[(size_t)bh * c.nseg + j];
  return exp_acc(r);
}

// Load rows [n0, n0+len) x cols [x0, x0+w) of view v (b, h) into smem tile (leading dim ld).
template <typename A, typename T>
__device__ __forceinline__ void load_tile(A* dst, int ld, const Tv<const T>& v, int b, int h, int64_t n0, int len,
                                          int x0, int w) {
  for (int idx = threadIdx.x; idx < len * w; idx += blockDim.x) {
    int r = idx / w, c = idx - r * w;
    dst[r * ld + c] = to_acc<A>(v.at(b, h, n0 + r, x0 + c));
  }
}

// ---------------------------------------------------------------------------------------------
// Phase 1: local state of one segment, columns [y0, y0+ty) of the (Dx x Ey) state of output head h.
//  REVERSE = false: L = sum_s suf_seg(s) x[s]^T y[s]          (x = k, y = v)
//  REVERSE = true:  M = scale * sum_t pre_seg(t) x[t]^T y[t]  (x = q, y = dout)
// (suf_seg, pre_seg: the ChunkDecay weights over the whole segment.)
// Output: W[((b*H + h)*nseg + seg) * Dx*Ey + d*Ey + e] for seg = seg0 + blockIdx.y (the grid may cover a
// subset of the segments).
template <typename T, typename A, bool REVERSE>
__global__ void state_local_kernel(Ctx<A> c, Tv<const T> x, Tv<const T> y, int Dx, int Ey, int C, int tile, A* W,
                                   int seg0) {
  extern __shared__ unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int ldx = Dx + 1;
  A* Xs = sm;
  A* Ys = Xs + C * ldx;
  A* Ss = Ys + C * tile;
  const int seg = seg0 + blockIdx.y, bh = blockIdx.x, b = bh / c.H, h = bh % c.H;
  const int hx = REVERSE ? h / c.gq : h / c.gk, hy = REVERSE ? h : h / c.gv;
  const int y0 = blockIdx.z * tile, ty = min(tile, Ey - y0);
  ChunkDecay<A> dec;
  dec.init(Ss + Dx * tile, C, c, bh, h);
  for (int i = threadIdx.x; i < Dx * ty; i += blockDim.x) Ss[i] = A(0);
  const int n0 = seg * c.seglen, n1 = min(c.N, n0 + c.seglen);
  const int nch = (n1 - n0 + C - 1) / C;
  for (int ci = 0; ci < nch; ++ci) {
    const int cc = REVERSE ? nch - 1 - ci : ci;
    const int c0 = n0 + cc * C, len = min(C, n1 - c0);
    __syncthreads();
    dec.set_chunk(c0, len);
    load_tile<A>(Xs, ldx, x, b, hx, c0, len, 0, Dx);
    load_tile<A>(Ys, tile, y, b, hy, c0, len, y0, ty);
    __syncthreads();
    const A tot = dec.tot();
    for (int i = threadIdx.x; i < Dx * ty; i += blockDim.x) {
      const int d = i / ty, e = i - d * ty;
      A acc = 0;
      for (int s = 0; s < len; ++s) {
        const A w = REVERSE ? dec.pre(s) : dec.suf(s);
        acc += w * Xs[s * ldx + d] * Ys[s * tile + e];
      }
      if (REVERSE) acc *= c.scale;
      Ss[i] = tot * Ss[i] + acc;
    }
  }
  __syncthreads();
  A* out = W + ((size_t)bh * c.nseg + seg) * (size_t)Dx * Ey;
  for (int i = threadIdx.x; i < Dx * ty; i += blockDim.x) {
    const int d = i / ty, e = i - d * ty;
    out[(size_t)d * Ey + y0 + e] = Ss[i];
  }
}

// With gates: the sum of each segment's log gates, seglog[(b*H + h)*nseg + j] (-inf where it holds a reset).
// One block per segment (blockDim.x a multiple of 32, at most 1024): a strided sum per thread, then the
// block's sum (a serial loop per segment would take milliseconds on long rows: 16K dependent loads).
template <typename A>
__global__ void segment_gate_logs_kernel(Ctx<A> c, A* seglog) {
  const int64_t i = blockIdx.x;  // (b * H + h) * nseg + j
  const int j = (int)(i % c.nseg);
  const int64_t bh = i / c.nseg;
  const int h = (int)(bh % c.H);
  const int n0 = j * c.seglen, n1 = min(c.N, n0 + c.seglen);
  const A* g = c.g + bh * c.N;
  A r = 0;
  for (int t = n0 + (int)threadIdx.x; t < n1; t += (int)blockDim.x) r += g[t];
  __shared__ A warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = r;
  __syncthreads();
  if (threadIdx.x < 32) {
    r = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : A(0);
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
    if (threadIdx.x == 0) seglog[i] = log_gamma(c, h) * A(n1 - n0) + r;
  }
}

// ---------------------------------------------------------------------------------------------
// Phase 2: the segments' local states combined in segment order, one thread per state element.
// T_j: segment j's transition, gamma^len(j), or with gates exp(seglog[j]).
// Forward (kReverse = false): W[j] holds L_j on entry and (in_place) S_in(j) on exit;
//   S_in(0) = start (state_in, or 0); S_in(j) = T_(j-1) S_in(j-1) + L_(j-1);
//   end (state_out) = T_last S_in(last) + L_last.
// Backward (kReverse = true): W[j] holds M_j on entry and (in_place) G_j (gradient w.r.t. the state at
//   the end of segment j) on exit; G_last = start (grad_state_out, or 0); G_j = T_(j+1) G_(j+1) +
//   M_(j+1); end (grad_state_in) = T_0 G_0 + M_0.
// skip = 1: the local state of the last segment visited (forward: the last, backward: the first) is not
// read (phase 1 did not compute it); end must then be null, since it needs that state.
constexpr int kScanBatch = 8;

template <typename A, bool kReverse>
__global__ void scan_kernel(Ctx<A> c, A* W, const A* start, A* end, bool in_place, int skip, const A* seglog) {
  const int DE = c.D * c.E;
  const int bh = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= DE) return;
  const A lg = log_gamma(c, bh % c.H);
  A run = start ? start[(size_t)bh * DE + i] : A(0);
  A* w = W + (size_t)bh * c.nseg * DE + i;
  auto seg = [&](int t) { return kReverse ? c.nseg - 1 - t : t; };  // the t-th segment visited
  // kScanBatch loads in flight before the batch's stores (in place, a store would otherwise order every
  // next load behind it: one memory latency per segment)
  for (int t0 = 0; t0 < c.nseg; t0 += kScanBatch) {
    A l[kScanBatch];
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u) l[u] = t0 + u < c.nseg - skip ? w[(size_t)seg(t0 + u) * DE] : A(0);
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u) {
      if (t0 + u >= c.nseg) break;
      const int j = seg(t0 + u);
      const int len = min(c.seglen, c.N - j * c.seglen);
      if (in_place) w[(size_t)j * DE] = run;
      const A tr = seglog ? exp_acc(seglog[(size_t)bh * c.nseg + j]) : exp_acc(lg * A(len));
      run = tr * run + l[u];
    }
  }
  if (end) end[(size_t)bh * DE + i] = run;
}

// ---------------------------------------------------------------------------------------------
// Phase 3, forward: o for columns [e0, e0+tile) of one segment, output head h.
// The segment's carried state: segS (its phase-2 input state) with several segments, else state_in (or 0).
template <typename T, typename A>
__global__ void fwd_main_kernel(Ctx<A> c, Tv<const T> q, Tv<const T> k, Tv<const T> v, Tv<T> o, const A* state_in,
                                const A* segS, A* state_out, int C, int tile) {
  extern __shared__ unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int D = c.D, E = c.E, ld = D + 1;
  A* Qs = sm;
  A* Ks = Qs + C * ld;
  A* Vs = Ks + C * ld;
  A* Ps = Vs + C * tile;
  A* Ss = Ps + C * C;     // the carried state's columns [e0, e0+te): D x te, row-major (leading dim te)
  const int seg = blockIdx.y, bh = blockIdx.x, b = bh / c.H, h = bh % c.H;
  const int hq = h / c.gq, hk = h / c.gk, hv = h / c.gv;
  const int e0 = blockIdx.z * tile, te = min(tile, E - e0);
  ChunkDecay<A> dec;
  dec.init(Ss + D * tile, C, c, bh, h);
  const A* S0 = c.nseg > 1 ? segS + ((size_t)bh * c.nseg + seg) * D * E : (state_in ? state_in + (size_t)bh * D * E : nullptr);
  for (int i = threadIdx.x; i < D * te; i += blockDim.x) {
    const int d = i / te, e = i - d * te;
    Ss[i] = S0 ? S0[(size_t)d * E + e0 + e] : A(0);
  }
  const int n0 = seg * c.seglen, n1 = min(c.N, n0 + c.seglen);
  for (int c0 = n0; c0 < n1; c0 += C) {
    const int len = min(C, n1 - c0);
    __syncthreads();
    dec.set_chunk(c0, len);
    load_tile<A>(Qs, ld, q, b, hq, c0, len, 0, D);
    load_tile<A>(Ks, ld, k, b, hk, c0, len, 0, D);
    load_tile<A>(Vs, tile, v, b, hv, c0, len, e0, te);
    __syncthreads();
    for (int i = threadIdx.x; i < len * len; i += blockDim.x) {
      const int t = i / len, s = i - t * len;
      if (s > t) continue;
      A acc = 0;
      for (int d = 0; d < D; ++d) acc += Qs[t * ld + d] * Ks[s * ld + d];
      Ps[t * C + s] = c.scale * dec.w(t, s) * acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < len * te; i += blockDim.x) {
      const int t = i / te, e = i - t * te;
      A acc = 0;
      for (int s = 0; s <= t; ++s) acc += Ps[t * C + s] * Vs[s * tile + e];
      A inter = 0;
      for (int d = 0; d < D; ++d) inter += Qs[t * ld + d] * Ss[d * te + e];
      acc += c.scale * dec.pre(t) * inter;
      o.at(b, h, c0 + t, e0 + e) = from_acc<T>(acc);
    }
    __syncthreads();
    const A tot = dec.tot();
    for (int i = threadIdx.x; i < D * te; i += blockDim.x) {
      const int d = i / te, e = i - d * te;
      A acc = 0;
      for (int s = 0; s < len; ++s) acc += dec.suf(s) * Ks[s * ld + d] * Vs[s * tile + e];
      Ss[i] = tot * Ss[i] + acc;
    }
  }
  if (state_out && seg == c.nseg - 1) {  // the state after the sequence's last chunk
    __syncthreads();
    for (int i = threadIdx.x; i < D * te; i += blockDim.x) {
      const int d = i / te, e = i - d * te;
      state_out[(size_t)bh * D * E + (size_t)d * E + e0 + e] = Ss[i];
    }
  }
}

// The gradient of the gates (lasp_params.h, dg_part; the CPU backward sums the same terms). Per output head:
//   dg[j] = sum_{t >= j} a[t] - sum_{s >= j} b[s] + sum_{s < j} p[s] + <S_in, T G>
// a[t] = q[t].dq_h[t] without the s = t pair (the pairs (x, t), x < t a token or S_in), b[s] = k[s].dk_h[s]
// without the s = t pair and without G's term (the pairs (s, t), t > s a token), p[s] = k[s].(G's term of
// dk_h[s]) (the pair (s, G)), T the piece's transition. Each sum reads only pairs that span token j, and G's
// part is carried apart from the tokens' (split below), so no term enters twice with opposite signs.
// bwd_dqdk_kernel adds a[t] - b[s] into dg (zeroed first) and p[s] into gp; dg_finish_kernel forms the sums.

// Phase 3, backward, dq and dk for rows [d0, d0+tile) of the head dim D (per output head h).
//  loop 1 (forward over chunks, state S):  dq[t] = sum_{s<=t} scale w(t,s) (do[t].v[s]) k[s] + scale pre(t) do[t] S^T
//  loop 2 (backward over chunks, state R): dk[s] = sum_{t>=s} scale w(t,s) (do[t].v[s]) q[t] + suf(s) v[s] R^T
// dq, dk go to views of output-head rows (OT = T where each q / k head has one output head, else a
// per-output-head workspace in the acc type, reduced later). split (gates with a G): the scan ran without
// G, R carries the tokens' part (R'), and G's part is added per token as sufp(s) v[s] G^T, sufp(s) the
// transition from token s to the piece's end.
template <typename T, typename A, typename OT>
__global__ void bwd_dqdk_kernel(Ctx<A> c, Tv<const T> q, Tv<const T> k, Tv<const T> v, Tv<const T> dout, Tv<OT> dq,
                                Tv<OT> dk, const A* state_in, const A* grad_state_out, const A* segS,
                                const A* segG, A* grad_state_in, A* dg, A* gp, const A* seglog, int split, int C,
                                int tile) {
  extern __shared__ unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int D = c.D, E = c.E, lde = E + 1, ldx = tile + 1;
  A* DOs = sm;
  A* Vs = DOs + C * lde;
  A* Xs = Vs + C * lde;   // k (loop 1) or q (loop 2), columns [d0, d0+td)
  A* Ps = Xs + C * ldx;
  A* Ss = Ps + C * C;     // td x E: S, then R
  A* Dc = Ss + tile * E;  // decay
  // with dg: q (loop 1) or k (loop 2) columns [d0, d0+td), the chunk's a / b and p sums, G's rows
  A* Ys = Dc + decay_smem_elems(C);
  A* dgs = Ys + C * ldx;
  A* gps = dgs + C;
  A* Gs = gps + C;
  const int seg = blockIdx.y, bh = blockIdx.x, b = bh / c.H, h = bh % c.H;
  const int hq = h / c.gq, hk = h / c.gk, hv = h / c.gv;
  const int d0 = blockIdx.z * tile, td = min(tile, D - d0);
  ChunkDecay<A> dec;
  dec.init(Dc, C, c, bh, h);
  const int n0 = seg * c.seglen, n1 = min(c.N, n0 + c.seglen);
  const int nch = (n1 - n0 + C - 1) / C;
  if (dg) {
    for (int i = threadIdx.x; i < C; i += blockDim.x) dgs[i] = gps[i] = A(0);
  }
  // ---- loop 1: dq ----
  {
    const A* S0 = c.nseg > 1 ? segS + ((size_t)bh * c.nseg + seg) * D * E : (state_in ? state_in + (size_t)bh * D * E : nullptr);
    for (int i = threadIdx.x; i < td * E; i += blockDim.x) {
      const int d = i / E, e = i - d * E;
      Ss[i] = S0 ? S0[(size_t)(d0 + d) * E + e] : A(0);
    }
  }
  for (int ci = 0; ci < nch; ++ci) {
    const int c0 = n0 + ci * C, len = min(C, n1 - c0);
    __syncthreads();
    dec.set_chunk(c0, len);
    load_tile<A>(DOs, lde, dout, b, h, c0, len, 0, E);
    load_tile<A>(Vs, lde, v, b, hv, c0, len, 0, E);
    load_tile<A>(Xs, ldx, k, b, hk, c0, len, d0, td);
    if (dg) load_tile<A>(Ys, ldx, q, b, hq, c0, len, d0, td);
    __syncthreads();
    for (int i = threadIdx.x; i < len * len; i += blockDim.x) {
      const int t = i / len, s = i - t * len;
      if (s > t) continue;
      A acc = 0;
      for (int e = 0; e < E; ++e) acc += DOs[t * lde + e] * Vs[s * lde + e];
      Ps[t * C + s] = c.scale * dec.w(t, s) * acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < len * td; i += blockDim.x) {
      const int t = i / td, d = i - t * td;
      A acc = 0;
      for (int s = 0; s < t; ++s) acc += Ps[t * C + s] * Xs[s * ldx + d];
      A inter = 0;
      for (int e = 0; e < E; ++e) inter += DOs[t * lde + e] * Ss[d * E + e];
      acc += c.scale * dec.pre(t) * inter;  // the pairs (x, t), x < t
      if (dg) atomicAdd(&dgs[t], Ys[t * ldx + d] * acc);
      acc += Ps[t * C + t] * Xs[t * ldx + d];
      dq.at(b, h, c0 + t, d0 + d) = from_acc<OT>(acc);
    }
    __syncthreads();
    if (dg) {
      for (int t = threadIdx.x; t < len; t += blockDim.x) {
        atomicAdd(&dg[(size_t)bh * c.N + c0 + t], dgs[t]);
        dgs[t] = A(0);
      }
    }
    if (ci + 1 < nch) {
      const A tot = dec.tot();
      for (int i = threadIdx.x; i < td * E; i += blockDim.x) {
        const int d = i / E, e = i - d * E;
        A acc = 0;
        for (int s = 0; s < len; ++s) acc += dec.suf(s) * Xs[s * ldx + d] * Vs[s * lde + e];
        Ss[i] = tot * Ss[i] + acc;
      }
    }
  }
  // ---- loop 2: dk ----
  __syncthreads();
  {
    const A* G0 = c.nseg > 1 ? segG + ((size_t)bh * c.nseg + seg) * D * E
                             : (split ? nullptr : (grad_state_out ? grad_state_out + (size_t)bh * D * E : nullptr));
    for (int i = threadIdx.x; i < td * E; i += blockDim.x) {
      const int d = i / E, e = i - d * E;
      Ss[i] = G0 ? G0[(size_t)(d0 + d) * E + e] : A(0);
      if (split) Gs[i] = grad_state_out[(size_t)bh * D * E + (size_t)(d0 + d) * E + e];
    }
  }
  A after = split ? after_segment(c, seglog, bh, h, seg) : A(0);  // transition from the chunk's end to the piece's
  for (int ci = nch - 1; ci >= 0; --ci) {
    const int c0 = n0 + ci * C, len = min(C, n1 - c0);
    __syncthreads();
    dec.set_chunk(c0, len);
    load_tile<A>(DOs, lde, dout, b, h, c0, len, 0, E);
    load_tile<A>(Vs, lde, v, b, hv, c0, len, 0, E);
    load_tile<A>(Xs, ldx, q, b, hq, c0, len, d0, td);
    if (dg) load_tile<A>(Ys, ldx, k, b, hk, c0, len, d0, td);
    __syncthreads();
    // Ps[s][t] = scale w(t,s) (do[t].v[s]) for t >= s
    for (int i = threadIdx.x; i < len * len; i += blockDim.x) {
      const int s = i / len, t = i - s * len;
      if (t < s) continue;
      A acc = 0;
      for (int e = 0; e < E; ++e) acc += DOs[t * lde + e] * Vs[s * lde + e];
      Ps[s * C + t] = c.scale * dec.w(t, s) * acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < len * td; i += blockDim.x) {
      const int s = i / td, d = i - s * td;
      A acc = 0;
      for (int t = s + 1; t < len; ++t) acc += Ps[s * C + t] * Xs[t * ldx + d];
      A inter = 0;
      for (int e = 0; e < E; ++e) inter += Vs[s * lde + e] * Ss[d * E + e];
      acc += dec.suf(s) * inter;  // the pairs (s, t), t > s a token
      if (dg) atomicAdd(&dgs[s], -Ys[s * ldx + d] * acc);
      acc += Ps[s * C + s] * Xs[s * ldx + d];
      if (split) {  // G's term, and the pair (s, G)
        A gi = 0;
        for (int e = 0; e < E; ++e) gi += Vs[s * lde + e] * Gs[d * E + e];
        gi *= dec.suf(s) * after;
        atomicAdd(&gps[s], Ys[s * ldx + d] * gi);
        acc += gi;
      }
      dk.at(b, h, c0 + s, d0 + d) = from_acc<OT>(acc);
    }
    __syncthreads();
    if (dg) {
      for (int t = threadIdx.x; t < len; t += blockDim.x) {
        atomicAdd(&dg[(size_t)bh * c.N + c0 + t], dgs[t]);
        dgs[t] = A(0);
        if (split) {
          atomicAdd(&gp[(size_t)bh * c.N + c0 + t], gps[t]);
          gps[t] = A(0);
        }
      }
    }
    const A tot = dec.tot();
    for (int i = threadIdx.x; i < td * E; i += blockDim.x) {
      const int d = i / E, e = i - d * E;
      A acc = 0;
      for (int t = 0; t < len; ++t) acc += dec.pre(t) * Xs[t * ldx + d] * DOs[t * lde + e];
      Ss[i] = tot * Ss[i] + c.scale * acc;
    }
    after *= tot;
  }
  if (grad_state_in && seg == 0) {  // the state gradient before the sequence's first chunk
    __syncthreads();
    for (int i = threadIdx.x; i < td * E; i += blockDim.x) {
      const int d = i / E, e = i - d * E;
      const A r = split ? Ss[i] + after * Gs[i] : Ss[i];
      grad_state_in[(size_t)bh * D * E + (size_t)(d0 + d) * E + e] = r;
    }
  }
}

// Phase 3, backward, dv for columns [e0, e0+tile) (per output head h; backward over chunks, state R):
//  dv[s] = sum_{t>=s} scale w(t,s) (q[t].k[s]) do[t] + suf(s) k[s] R
// split: the scan ran without G; R starts from the segment's G' plus G seen from the segment's end.
template <typename T, typename A, typename OT>
__global__ void bwd_dv_kernel(Ctx<A> c, Tv<const T> q, Tv<const T> k, Tv<const T> dout, Tv<OT> dv,
                              const A* grad_state_out, const A* segG, const A* seglog, int split, int C, int tile) {
  extern __shared__ unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int D = c.D, E = c.E, ld = D + 1;
  A* Qs = sm;
  A* Ks = Qs + C * ld;
  A* DOs = Ks + C * ld;
  A* Ps = DOs + C * tile;
  A* Rs = Ps + C * C;     // the state gradient's columns [e0, e0+te): D x te, row-major (leading dim te)
  const int seg = blockIdx.y, bh = blockIdx.x, b = bh / c.H, h = bh % c.H;
  const int hq = h / c.gq, hk = h / c.gk;
  const int e0 = blockIdx.z * tile, te = min(tile, E - e0);
  ChunkDecay<A> dec;
  dec.init(Rs + D * tile, C, c, bh, h);
  {
    const A* G0 = c.nseg > 1 ? segG + ((size_t)bh * c.nseg + seg) * D * E
                             : (split ? nullptr : (grad_state_out ? grad_state_out + (size_t)bh * D * E : nullptr));
    const A after = split ? after_segment(c, seglog, bh, h, seg) : A(0);
    for (int i = threadIdx.x; i < D * te; i += blockDim.x) {
      const int d = i / te, e = i - d * te;
      A r = G0 ? G0[(size_t)d * E + e0 + e] : A(0);
      if (split) r += after * grad_state_out[(size_t)bh * D * E + (size_t)d * E + e0 + e];
      Rs[i] = r;
    }
  }
  const int n0 = seg * c.seglen, n1 = min(c.N, n0 + c.seglen);
  const int nch = (n1 - n0 + C - 1) / C;
  for (int ci = nch - 1; ci >= 0; --ci) {
    const int c0 = n0 + ci * C, len = min(C, n1 - c0);
    __syncthreads();
    dec.set_chunk(c0, len);
    load_tile<A>(Qs, ld, q, b, hq, c0, len, 0, D);
    load_tile<A>(Ks, ld, k, b, hk, c0, len, 0, D);
    load_tile<A>(DOs, tile, dout, b, h, c0, len, e0, te);
    __syncthreads();
    for (int i = threadIdx.x; i < len * len; i += blockDim.x) {
      const int s = i / len, t = i - s * len;
      if (t < s) continue;
      A acc = 0;
      for (int d = 0; d < D; ++d) acc += Qs[t * ld + d] * Ks[s * ld + d];
      Ps[s * C + t] = c.scale * dec.w(t, s) * acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < len * te; i += blockDim.x) {
      const int s = i / te, e = i - s * te;
      A acc = 0;
      for (int t = s; t < len; ++t) acc += Ps[s * C + t] * DOs[t * tile + e];
      A inter = 0;
      for (int d = 0; d < D; ++d) inter += Ks[s * ld + d] * Rs[d * te + e];
      acc += dec.suf(s) * inter;
      dv.at(b, h, c0 + s, e0 + e) = from_acc<OT>(acc);
    }
    __syncthreads();
    const A tot = dec.tot();
    for (int i = threadIdx.x; i < D * te; i += blockDim.x) {
      const int d = i / te, e = i - d * te;
      A acc = 0;
      for (int t = 0; t < len; ++t) acc += dec.pre(t) * Qs[t * ld + d] * DOs[t * tile + e];
      Rs[i] = tot * Rs[i] + c.scale * acc;
    }
  }
}

// dg from the per-token sums the dq / dk kernel left (see above), one block per (b, h):
//   dg[j] = sum_{t >= j} dg_in[t] + sum_{s < j} gp[s] + exp(sum of the piece's log gates) <S_in, G>
// (The wgmma backward, which runs without G, leaves dg_in alone: dg[j] = sum_{t >= j} dg_in[t].)
constexpr int kFinishThreads = 256;

// dg of the wgmma backward with gates (wgmma_bwd.cu), in place, one warp per 64-token chunk of a row:
// row[s] = sum of row[t] over the tokens t >= s of s's chunk + T[chunk] (row held each token's
// q.dq - k.dk; T, (rows, ceil(N / 64)), the same sum over every token after the chunk).
template <typename A>
__global__ void dg_chunk_finish_kernel(int64_t rows, int N, A* dg, const float* T) {
  const int nct = (N + 63) / 64, lane = threadIdx.x & 31;
  const int64_t w = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (w >= rows * nct) return;
  A* row = dg + (w / nct) * N;
  const int t0 = (int)(w % nct) * 64 + 2 * lane;
  const A x0 = t0 < N ? row[t0] : A(0), x1 = t0 + 1 < N ? row[t0 + 1] : A(0);
  A inc = x0 + x1;  // suffix sums over the lanes
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const A y = __shfl_down_sync(0xffffffffu, inc, o);
    if (lane + o < 32) inc += y;
  }
  A ex = __shfl_down_sync(0xffffffffu, inc, 1);
  if (lane == 31) ex = A(0);
  const A tail = A(T[w]) + ex;
  if (t0 < N) row[t0] = tail + x1 + x0;
  if (t0 + 1 < N) row[t0 + 1] = tail + x1;
}

template <typename A>
__global__ void dg_finish_kernel(Ctx<A> c, A* dg, const A* gp, const A* state_in, const A* grad_state_out) {
  __shared__ A tot_dg[kFinishThreads], tot_gp[kFinishThreads], red[kFinishThreads];
  const int bh = blockIdx.x, h = bh % c.H, tid = threadIdx.x;
  const int N = c.N, per = (N + kFinishThreads - 1) / kFinishThreads;
  const int t0 = min(N, tid * per), t1 = min(N, t0 + per);
  A* row = dg + (size_t)bh * N;
  const A* prow = gp ? gp + (size_t)bh * N : nullptr;
  // <S_in, G> and the piece's log transition
  A dot = 0, lsum = 0;
  if (state_in && grad_state_out) {
    const size_t DE = (size_t)c.D * c.E;
    for (size_t i = tid; i < DE; i += kFinishThreads) dot += state_in[bh * DE + i] * grad_state_out[bh * DE + i];
  }
  const A* grow = c.g + (size_t)bh * N;
  for (int t = tid; t < N; t += kFinishThreads) lsum += grow[t];
  A sd = 0, sp = 0;
  for (int t = t0; t < t1; ++t) {
    sd += row[t];
    if (prow) sp += prow[t];
  }
  tot_dg[tid] = sd;
  tot_gp[tid] = sp;
  red[tid] = dot;
  __syncthreads();
  if (tid == 0) {
    A d = 0;
    for (int i = 0; i < kFinishThreads; ++i) d += red[i];
    red[0] = d;
  }
  __syncthreads();
  const A sdot = red[0];
  __syncthreads();
  red[tid] = lsum;
  __syncthreads();
  if (tid == 0) {
    A l = 0;
    for (int i = 0; i < kFinishThreads; ++i) l += red[i];
    red[0] = l + log_gamma(c, h) * A(N);
    // exclusive scans: suffix of the dg sums (threads after), prefix of the gp sums (threads before)
    A run = 0;
    for (int i = kFinishThreads - 1; i >= 0; --i) {
      const A x = tot_dg[i];
      tot_dg[i] = run;
      run += x;
    }
    run = 0;
    for (int i = 0; i < kFinishThreads; ++i) {
      const A x = tot_gp[i];
      tot_gp[i] = run;
      run += x;
    }
  }
  __syncthreads();
  const A sin_g = sdot == A(0) ? A(0) : exp_acc(red[0]) * sdot;
  A run = tot_dg[tid];
  for (int t = t1 - 1; t >= t0; --t) {
    run += row[t];
    row[t] = run;
  }
  A pre = tot_gp[tid];
  for (int t = t0; t < t1; ++t) {
    row[t] += pre + sin_g;
    if (prow) pre += prow[t];
  }
}

// ---------------------------------------------------------------------------------------------
// Head maps: out[b, x, n, :] = sum_{r < H / Hout} ws[b, x * (H / Hout) + r, n, :]   (ws contiguous (B, H, N, X),
// one row per output head: in A from the generic kernels, in T from the tensor-core ones; summed in A;
// out the (B, Hout, N, X) view of q, k or v heads).
template <typename T, typename A, typename W>
__global__ void reduce_heads_generic_kernel(Ctx<A> c, const W* ws, Tv<T> out, int Hout, int X) {
  const int group = c.H / Hout;
  const int64_t total = (int64_t)c.B * Hout * c.N * X;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int x = (int)(i % X);
    int64_t r = i / X;
    const int n = (int)(r % c.N);
    r /= c.N;
    const int ho = (int)(r % Hout);
    const int b = (int)(r / Hout);
    A acc = 0;
    for (int g = 0; g < group; ++g) acc += to_acc<A>(ws[(((int64_t)b * c.H + ho * group + g) * c.N + n) * X + x]);
    out.at(b, ho, n, x) = from_acc<T>(acc);
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace lasp
