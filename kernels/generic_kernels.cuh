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

// Powers gamma^i for i = 0 .. C into smem.
template <typename A>
__device__ __forceinline__ void fill_pow(A* Gp, int C, A lg) {
  for (int i = threadIdx.x; i <= C; i += blockDim.x) Gp[i] = exp_acc(lg * A(i));
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
// Phase 1: local state of one segment, columns [y0, y0+ty) of the (Dx x Ey) state.
//  REVERSE = false: L = sum_s gamma^(end-1-s) x[s]^T y[s]       (x = k, y = v; kv head)
//  REVERSE = true:  M = scale * sum_t gamma^(t-start+1) x[t]^T y[t] (x = q, y = dout; query head)
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
  A* Gp = Ss + Dx * tile;
  const int seg = seg0 + blockIdx.y, bh = blockIdx.x, b = bh / c.H, h = bh % c.H;
  const int hx = REVERSE ? h : h / c.group;
  const int y0 = blockIdx.z * tile, ty = min(tile, Ey - y0);
  const A lg = log_gamma(c, h);
  fill_pow(Gp, C, lg);
  for (int i = threadIdx.x; i < Dx * ty; i += blockDim.x) Ss[i] = A(0);
  const int n0 = seg * c.seglen, n1 = min(c.N, n0 + c.seglen);
  const int nch = (n1 - n0 + C - 1) / C;
  for (int ci = 0; ci < nch; ++ci) {
    const int cc = REVERSE ? nch - 1 - ci : ci;
    const int c0 = n0 + cc * C, len = min(C, n1 - c0);
    __syncthreads();
    load_tile<A>(Xs, ldx, x, b, hx, c0, len, 0, Dx);
    load_tile<A>(Ys, tile, y, b, hx, c0, len, y0, ty);
    __syncthreads();
    for (int i = threadIdx.x; i < Dx * ty; i += blockDim.x) {
      const int d = i / ty, e = i - d * ty;
      A acc = 0;
      for (int s = 0; s < len; ++s) {
        const A w = REVERSE ? Gp[s + 1] : Gp[len - 1 - s];
        acc += w * Xs[s * ldx + d] * Ys[s * tile + e];
      }
      if (REVERSE) acc *= c.scale;
      Ss[i] = Gp[len] * Ss[i] + acc;
    }
  }
  __syncthreads();
  A* out = W + ((size_t)bh * c.nseg + seg) * (size_t)Dx * Ey;
  for (int i = threadIdx.x; i < Dx * ty; i += blockDim.x) {
    const int d = i / ty, e = i - d * ty;
    out[(size_t)d * Ey + y0 + e] = Ss[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Phase 2: the segments' local states combined in segment order, one thread per state element.
// Forward (kReverse = false): W[j] holds L_j on entry and (in_place) S_in(j) on exit;
//   S_in(0) = start (state_in, or 0); S_in(j) = gamma^len(j-1) S_in(j-1) + L_(j-1);
//   end (state_out) = gamma^len(last) S_in(last) + L_last.
// Backward (kReverse = true): W[j] holds M_j on entry and (in_place) G_j (gradient w.r.t. the state at
//   the end of segment j) on exit; G_last = start (grad_state_out, or 0); G_j = gamma^len(j+1) G_(j+1) +
//   M_(j+1); end (grad_state_in) = gamma^len(0) G_0 + M_0.
// skip = 1: the local state of the last segment visited (forward: the last, backward: the first) is not
// read (phase 1 did not compute it); end must then be null, since it needs that state.
constexpr int kScanBatch = 8;

template <typename A, bool kReverse>
__global__ void scan_kernel(Ctx<A> c, A* W, const A* start, A* end, bool in_place, int skip) {
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
      run = exp_acc(lg * A(len)) * run + l[u];
    }
  }
  if (end) end[(size_t)bh * DE + i] = run;
}

// ---------------------------------------------------------------------------------------------
// Phase 3, forward: o for columns [e0, e0+tile) of one segment.
// S0: the segment's carried state (B,H,D,E)-indexed base (segment-resolved by the caller's layout), or null.
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
  A* Gp = Ss + D * tile;
  const int seg = blockIdx.y, bh = blockIdx.x, b = bh / c.H, h = bh % c.H, kh = h / c.group;
  const int e0 = blockIdx.z * tile, te = min(tile, E - e0);
  const A lg = log_gamma(c, h);
  fill_pow(Gp, C, lg);
  const A* S0 = c.nseg > 1 ? segS + ((size_t)bh * c.nseg + seg) * D * E : (state_in ? state_in + (size_t)bh * D * E : nullptr);
  for (int i = threadIdx.x; i < D * te; i += blockDim.x) {
    const int d = i / te, e = i - d * te;
    Ss[i] = S0 ? S0[(size_t)d * E + e0 + e] : A(0);
  }
  const int n0 = seg * c.seglen, n1 = min(c.N, n0 + c.seglen);
  for (int c0 = n0; c0 < n1; c0 += C) {
    const int len = min(C, n1 - c0);
    __syncthreads();
    load_tile<A>(Qs, ld, q, b, h, c0, len, 0, D);
    load_tile<A>(Ks, ld, k, b, kh, c0, len, 0, D);
    load_tile<A>(Vs, tile, v, b, kh, c0, len, e0, te);
    __syncthreads();
    for (int i = threadIdx.x; i < len * len; i += blockDim.x) {
      const int t = i / len, s = i - t * len;
      if (s > t) continue;
      A acc = 0;
      for (int d = 0; d < D; ++d) acc += Qs[t * ld + d] * Ks[s * ld + d];
      Ps[t * C + s] = c.scale * Gp[t - s] * acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < len * te; i += blockDim.x) {
      const int t = i / te, e = i - t * te;
      A acc = 0;
      for (int s = 0; s <= t; ++s) acc += Ps[t * C + s] * Vs[s * tile + e];
      A inter = 0;
      for (int d = 0; d < D; ++d) inter += Qs[t * ld + d] * Ss[d * te + e];
      acc += c.scale * Gp[t + 1] * inter;
      o.at(b, h, c0 + t, e0 + e) = from_acc<T>(acc);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D * te; i += blockDim.x) {
      const int d = i / te, e = i - d * te;
      A acc = 0;
      for (int s = 0; s < len; ++s) acc += Gp[len - 1 - s] * Ks[s * ld + d] * Vs[s * tile + e];
      Ss[i] = Gp[len] * Ss[i] + acc;
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

// ---------------------------------------------------------------------------------------------
// Phase 3, backward, dq and dk for rows [d0, d0+tile) of the head dim D (per query head h).
//  loop 1 (forward over chunks, state S):  dq[t] = sum_{s<=t} scale g^(t-s) (do[t].v[s]) k[s] + scale g^(t+1) do[t] S^T
//  loop 2 (backward over chunks, state R): dk[s] = sum_{t>=s} scale g^(t-s) (do[t].v[s]) q[t] + g^(len-1-s) v[s] R^T
// dk goes to dkv (OT = T when H == Hkv, else a per-query-head fp32 workspace reduced later).
template <typename T, typename A, typename OT>
__global__ void bwd_dqdk_kernel(Ctx<A> c, Tv<const T> q, Tv<const T> k, Tv<const T> v, Tv<const T> dout, Tv<T> dq,
                                Tv<OT> dk, int dk_per_query_head, const A* state_in, const A* grad_state_out,
                                const A* segS, const A* segG, A* grad_state_in, int C, int tile) {
  extern __shared__ unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int D = c.D, E = c.E, lde = E + 1, ldx = tile + 1;
  A* DOs = sm;
  A* Vs = DOs + C * lde;
  A* Xs = Vs + C * lde;   // k or q, columns [d0, d0+td)
  A* Ps = Xs + C * ldx;
  A* Ss = Ps + C * C;     // td x E: S, then R
  A* Gp = Ss + tile * E;
  const int seg = blockIdx.y, bh = blockIdx.x, b = bh / c.H, h = bh % c.H, kh = h / c.group;
  const int d0 = blockIdx.z * tile, td = min(tile, D - d0);
  const A lg = log_gamma(c, h);
  fill_pow(Gp, C, lg);
  const int n0 = seg * c.seglen, n1 = min(c.N, n0 + c.seglen);
  const int nch = (n1 - n0 + C - 1) / C;
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
    load_tile<A>(DOs, lde, dout, b, h, c0, len, 0, E);
    load_tile<A>(Vs, lde, v, b, kh, c0, len, 0, E);
    load_tile<A>(Xs, ldx, k, b, kh, c0, len, d0, td);
    __syncthreads();
    for (int i = threadIdx.x; i < len * len; i += blockDim.x) {
      const int t = i / len, s = i - t * len;
      if (s > t) continue;
      A acc = 0;
      for (int e = 0; e < E; ++e) acc += DOs[t * lde + e] * Vs[s * lde + e];
      Ps[t * C + s] = c.scale * Gp[t - s] * acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < len * td; i += blockDim.x) {
      const int t = i / td, d = i - t * td;
      A acc = 0;
      for (int s = 0; s <= t; ++s) acc += Ps[t * C + s] * Xs[s * ldx + d];
      A inter = 0;
      for (int e = 0; e < E; ++e) inter += DOs[t * lde + e] * Ss[d * E + e];
      acc += c.scale * Gp[t + 1] * inter;
      dq.at(b, h, c0 + t, d0 + d) = from_acc<T>(acc);
    }
    __syncthreads();
    if (ci + 1 < nch) {
      for (int i = threadIdx.x; i < td * E; i += blockDim.x) {
        const int d = i / E, e = i - d * E;
        A acc = 0;
        for (int s = 0; s < len; ++s) acc += Gp[len - 1 - s] * Xs[s * ldx + d] * Vs[s * lde + e];
        Ss[i] = Gp[len] * Ss[i] + acc;
      }
    }
  }
  // ---- loop 2: dk ----
  __syncthreads();
  {
    const A* G0 = c.nseg > 1 ? segG + ((size_t)bh * c.nseg + seg) * D * E
                             : (grad_state_out ? grad_state_out + (size_t)bh * D * E : nullptr);
    for (int i = threadIdx.x; i < td * E; i += blockDim.x) {
      const int d = i / E, e = i - d * E;
      Ss[i] = G0 ? G0[(size_t)(d0 + d) * E + e] : A(0);
    }
  }
  const int hk = dk_per_query_head ? h : kh;
  for (int ci = nch - 1; ci >= 0; --ci) {
    const int c0 = n0 + ci * C, len = min(C, n1 - c0);
    __syncthreads();
    load_tile<A>(DOs, lde, dout, b, h, c0, len, 0, E);
    load_tile<A>(Vs, lde, v, b, kh, c0, len, 0, E);
    load_tile<A>(Xs, ldx, q, b, h, c0, len, d0, td);
    __syncthreads();
    // Ps[s][t] = scale g^(t-s) (do[t].v[s]) for t >= s
    for (int i = threadIdx.x; i < len * len; i += blockDim.x) {
      const int s = i / len, t = i - s * len;
      if (t < s) continue;
      A acc = 0;
      for (int e = 0; e < E; ++e) acc += DOs[t * lde + e] * Vs[s * lde + e];
      Ps[s * C + t] = c.scale * Gp[t - s] * acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < len * td; i += blockDim.x) {
      const int s = i / td, d = i - s * td;
      A acc = 0;
      for (int t = s; t < len; ++t) acc += Ps[s * C + t] * Xs[t * ldx + d];
      A inter = 0;
      for (int e = 0; e < E; ++e) inter += Vs[s * lde + e] * Ss[d * E + e];
      acc += Gp[len - 1 - s] * inter;
      dk.at(b, hk, c0 + s, d0 + d) = from_acc<OT>(acc);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < td * E; i += blockDim.x) {
      const int d = i / E, e = i - d * E;
      A acc = 0;
      for (int t = 0; t < len; ++t) acc += Gp[t + 1] * Xs[t * ldx + d] * DOs[t * lde + e];
      Ss[i] = Gp[len] * Ss[i] + c.scale * acc;
    }
  }
  if (grad_state_in && seg == 0) {  // the state gradient before the sequence's first chunk
    __syncthreads();
    for (int i = threadIdx.x; i < td * E; i += blockDim.x) {
      const int d = i / E, e = i - d * E;
      grad_state_in[(size_t)bh * D * E + (size_t)(d0 + d) * E + e] = Ss[i];
    }
  }
}

// Phase 3, backward, dv for columns [e0, e0+tile) (per query head h; backward over chunks, state R):
//  dv[s] = sum_{t>=s} scale g^(t-s) (q[t].k[s]) do[t] + g^(len-1-s) k[s] R
template <typename T, typename A, typename OT>
__global__ void bwd_dv_kernel(Ctx<A> c, Tv<const T> q, Tv<const T> k, Tv<const T> dout, Tv<OT> dv, int dv_per_query_head,
                              const A* grad_state_out, const A* segG, int C, int tile) {
  extern __shared__ unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int D = c.D, E = c.E, ld = D + 1;
  A* Qs = sm;
  A* Ks = Qs + C * ld;
  A* DOs = Ks + C * ld;
  A* Ps = DOs + C * tile;
  A* Rs = Ps + C * C;     // the state gradient's columns [e0, e0+te): D x te, row-major (leading dim te)
  A* Gp = Rs + D * tile;
  const int seg = blockIdx.y, bh = blockIdx.x, b = bh / c.H, h = bh % c.H, kh = h / c.group;
  const int e0 = blockIdx.z * tile, te = min(tile, E - e0);
  const A lg = log_gamma(c, h);
  fill_pow(Gp, C, lg);
  {
    const A* G0 = c.nseg > 1 ? segG + ((size_t)bh * c.nseg + seg) * D * E
                             : (grad_state_out ? grad_state_out + (size_t)bh * D * E : nullptr);
    for (int i = threadIdx.x; i < D * te; i += blockDim.x) {
      const int d = i / te, e = i - d * te;
      Rs[i] = G0 ? G0[(size_t)d * E + e0 + e] : A(0);
    }
  }
  const int hv = dv_per_query_head ? h : kh;
  const int n0 = seg * c.seglen, n1 = min(c.N, n0 + c.seglen);
  const int nch = (n1 - n0 + C - 1) / C;
  for (int ci = nch - 1; ci >= 0; --ci) {
    const int c0 = n0 + ci * C, len = min(C, n1 - c0);
    __syncthreads();
    load_tile<A>(Qs, ld, q, b, h, c0, len, 0, D);
    load_tile<A>(Ks, ld, k, b, kh, c0, len, 0, D);
    load_tile<A>(DOs, tile, dout, b, h, c0, len, e0, te);
    __syncthreads();
    for (int i = threadIdx.x; i < len * len; i += blockDim.x) {
      const int s = i / len, t = i - s * len;
      if (t < s) continue;
      A acc = 0;
      for (int d = 0; d < D; ++d) acc += Qs[t * ld + d] * Ks[s * ld + d];
      Ps[s * C + t] = c.scale * Gp[t - s] * acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < len * te; i += blockDim.x) {
      const int s = i / te, e = i - s * te;
      A acc = 0;
      for (int t = s; t < len; ++t) acc += Ps[s * C + t] * DOs[t * tile + e];
      A inter = 0;
      for (int d = 0; d < D; ++d) inter += Ks[s * ld + d] * Rs[d * te + e];
      acc += Gp[len - 1 - s] * inter;
      dv.at(b, hv, c0 + s, e0 + e) = from_acc<OT>(acc);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D * te; i += blockDim.x) {
      const int d = i / te, e = i - d * te;
      A acc = 0;
      for (int t = 0; t < len; ++t) acc += Gp[t + 1] * Qs[t * ld + d] * DOs[t * tile + e];
      Rs[i] = Gp[len] * Rs[i] + c.scale * acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GQA: out[b, kh, n, x] = sum_{g < group} ws[b, kh*group + g, n, x]   (ws contiguous (B, H, N, X) in A)
template <typename T, typename A>
__global__ void gqa_reduce_kernel(Ctx<A> c, const A* ws, Tv<T> out, int X) {
  const int64_t total = (int64_t)c.B * c.Hkv * c.N * X;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int x = (int)(i % X);
    int64_t r = i / X;
    const int n = (int)(r % c.N);
    r /= c.N;
    const int kh = (int)(r % c.Hkv);
    const int b = (int)(r / c.Hkv);
    A acc = 0;
    for (int g = 0; g < c.group; ++g) acc += ws[(((int64_t)b * c.H + kh * c.group + g) * c.N + n) * X + x];
    out.at(b, kh, n, x) = from_acc<T>(acc);
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace lasp
