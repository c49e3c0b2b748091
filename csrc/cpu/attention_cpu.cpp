// Chunked linear attention on the CPU: the reference-quality backend every other backend is held to.
// One (batch, head) pair per task, chunks of kChunk tokens, the state carried in the accumulation
// type (float, or double for float64 inputs). See docs/design.md, "Chunked form".
#include "cpu/attention_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace lasp {
namespace cpu {
namespace {

constexpr int64_t kChunk = 64;

// Element (b, h, n, i) of a strided view.
template <typename T>
inline T* at4(const TensorView4& t, int64_t b, int64_t h, int64_t n, int64_t i) {
  return static_cast<T*>(t.ptr) + b * t.stride[0] + h * t.stride[1] + n * t.stride[2] + i * t.stride[3];
}

// Copy rows [n0, n0 + len) of head (b, h) into a dense acc buffer of shape (len, width).
template <typename scalar_t, typename acc_t>
void load_rows(const TensorView4& t, int64_t b, int64_t h, int64_t n0, int64_t len, int64_t width, acc_t* out) {
  for (int64_t r = 0; r < len; ++r) {
    const scalar_t* row = at4<scalar_t>(t, b, h, n0 + r, 0);
    for (int64_t i = 0; i < width; ++i) out[r * width + i] = static_cast<acc_t>(row[i * t.stride[3]]);
  }
}

template <typename scalar_t, typename acc_t>
void store_rows(const TensorView4& t, int64_t b, int64_t h, int64_t n0, int64_t len, int64_t width, const acc_t* in) {
  for (int64_t r = 0; r < len; ++r) {
    scalar_t* row = at4<scalar_t>(t, b, h, n0 + r, 0);
    for (int64_t i = 0; i < width; ++i) row[i * t.stride[3]] = static_cast<scalar_t>(in[r * width + i]);
  }
}

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The log gates of one (b, h): lam[t] = g[b, h, t] - lambda_h, or -lambda_h for every token without g
// (lasp_params.h). Per chunk of L tokens starting at c0 (set_chunk), the weights every pass reads:
//   w(t, s) = exp(sum_{s < i <= t} lam[i])  (s <= t: the decay from token s to token t)
//   pre(t)  = exp(sum_{i <= t} lam[i])      (the chunk's incoming state seen at token t)
//   suf(s)  = exp(sum_{s < i < L} lam[i])   (token s seen at the chunk's end)
//   tot()   = exp(sum_{i < L} lam[i])       (the chunk's transition)
// Constant decay reads a table of gamma^i (exp of the exact exponent, no repeated products). With gates
// every weight is the exp of a sum over its own range, never a difference of cumulative sums, so a -inf
// gate (a reset) gives exact zeros and never inf - inf.
template <typename acc_t>
struct Gates {
  acc_t lambda = 0;
  const acc_t* g = nullptr;  // row (b, h) of g, or null
  acc_t pw[kChunk + 1];
  int64_t L = 0;
  std::vector<acc_t> W, pre_, suf_;
  acc_t tot_ = 1, log_tot = 0;

  Gates(const AttnParams& p, int64_t b, int64_t h) {
    if (p.decay) lambda = finite_rate(static_cast<const acc_t*>(p.decay)[h]);
    for (int64_t i = 0; i <= kChunk; ++i) pw[i] = std::exp(-lambda * static_cast<acc_t>(i));
    if (p.g) {
      g = static_cast<const acc_t*>(p.g) + (b * p.H + h) * p.N;
      W.resize(kChunk * kChunk);
      pre_.resize(kChunk);
      suf_.resize(kChunk);
    }
  }
  // Fills the weights of the chunk [c0, c0 + len).
  void set_chunk(int64_t c0, int64_t len) {
    L = len;
    if (!g) {
      log_tot = -lambda * static_cast<acc_t>(len);
      tot_ = pw[len];
      return;
    }
    acc_t lam[kChunk];
    for (int64_t t = 0; t < len; ++t) lam[t] = g[c0 + t] - lambda;
    for (int64_t t = 0; t < len; ++t) {
      acc_t run = 0;
      W[t * kChunk + t] = 1;
      for (int64_t s = t - 1; s >= 0; --s) {
        run += lam[s + 1];
        W[t * kChunk + s] = std::exp(run);
      }
    }
    acc_t run = 0;
    for (int64_t t = 0; t < len; ++t) {
      run += lam[t];
      pre_[t] = std::exp(run);
    }
    log_tot = run;
    tot_ = std::exp(run);
    run = 0;
    for (int64_t s = len - 1; s >= 0; --s) {
      suf_[s] = std::exp(run);
      run += lam[s];
    }
  }
  acc_t w(int64_t t, int64_t s) const { return g ? W[t * kChunk + s] : pw[t - s]; }
  acc_t pre(int64_t t) const { return g ? pre_[t] : pw[t + 1]; }
  acc_t suf(int64_t s) const { return g ? suf_[s] : pw[L - 1 - s]; }
  acc_t tot() const { return tot_; }
};

// Which input head a chunk buffer holds: take(x) says whether head x must be loaded into it (the output
// heads a task walks in order read their q, k, v heads in order, so each is loaded once per chunk).
struct HeadRows {
  int64_t head = -1;
  bool take(int64_t x) {
    if (x == head) return false;
    head = x;
    return true;
  }
};

// The q, k and v heads output head h reads (lasp_params.h, head maps).
struct Heads {
  int64_t q, k, v;
  Heads(const AttnParams& p, int64_t h) : q(h / (p.H / p.Hq)), k(h / (p.H / p.Hkv)), v(h / (p.H / p.Hv)) {}
};

// S = the given state (at offset `off`), or zero when there is none.
template <typename acc_t>
void load_state(const void* state, int64_t off, int64_t size, acc_t* S) {
  if (state) {
    std::copy_n(static_cast<const acc_t*>(state) + off, size, S);
  } else {
    std::fill(S, S + size, acc_t(0));
  }
}

// The state across one chunk of L tokens (gates set to it): S = tot S + sum_s suf(s) k[s]^T v[s].
template <typename acc_t>
void advance_state(const Gates<acc_t>& dec, const acc_t* K, const acc_t* V, int64_t L, int64_t D, int64_t E,
                   acc_t* S) {
  const acc_t wl = dec.tot();
  for (int64_t x = 0; x < D * E; ++x) S[x] *= wl;
  for (int64_t s = 0; s < L; ++s) {
    const acc_t w = dec.suf(s);
    for (int64_t i = 0; i < D; ++i) {
      const acc_t ki = K[s * D + i] * w;
      acc_t* srow = &S[i * E];
      const acc_t* vs = &V[s * E];
      for (int64_t j = 0; j < E; ++j) srow[j] += ki * vs[j];
    }
  }
}

// ---------------------------------------------------------------- forward
template <typename scalar_t, typename acc_t>
void fwd_impl(const AttnParams& p) {
  const int64_t D = p.D, E = p.E, N = p.N;
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(D * E), Q(kChunk * D), K(kChunk * D), V(kChunk * E), O(kChunk * E), A(kChunk * kChunk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const Heads hd(p, h);
      Gates<acc_t> dec(p, b, h);
      const acc_t scale = static_cast<acc_t>(p.scale);
      load_state(p.state_in, bh * D * E, D * E, S.data());
      for (int64_t c0 = 0; c0 < N; c0 += kChunk) {
        const int64_t L = std::min(kChunk, N - c0);
        dec.set_chunk(c0, L);
        load_rows<scalar_t>(p.q, b, hd.q, c0, L, D, Q.data());
        load_rows<scalar_t>(p.k, b, hd.k, c0, L, D, K.data());
        load_rows<scalar_t>(p.v, b, hd.v, c0, L, E, V.data());
        // Inter-chunk part: gamma^(t+1) q[t] S_in.
        for (int64_t t = 0; t < L; ++t) {
          acc_t* o = &O[t * E];
          std::fill(o, o + E, acc_t(0));
          for (int64_t i = 0; i < D; ++i) {
            const acc_t qi = Q[t * D + i];
            const acc_t* srow = &S[i * E];
            for (int64_t j = 0; j < E; ++j) o[j] += qi * srow[j];
          }
          const acc_t w = dec.pre(t);
          for (int64_t j = 0; j < E; ++j) o[j] *= w;
        }
        // Intra-chunk part: ((Q K^T) * M) V.
        for (int64_t t = 0; t < L; ++t) {
          for (int64_t s = 0; s <= t; ++s) A[t * kChunk + s] = dot(&Q[t * D], &K[s * D], D) * dec.w(t, s);
          acc_t* o = &O[t * E];
          for (int64_t s = 0; s <= t; ++s) {
            const acc_t a = A[t * kChunk + s];
            const acc_t* vs = &V[s * E];
            for (int64_t j = 0; j < E; ++j) o[j] += a * vs[j];
          }
          for (int64_t j = 0; j < E; ++j) o[j] *= scale;
        }
        store_rows<scalar_t>(p.o, b, h, c0, L, E, O.data());
        // State update: S = gamma^L S + sum_s gamma^(L-1-s) k[s]^T v[s].
        advance_state(dec, K.data(), V.data(), L, D, E, S.data());
      }
      if (p.state_out) std::copy(S.begin(), S.end(), static_cast<acc_t*>(p.state_out) + bh * D * E);
    }
  });
}

// fwd_local: L = sum_s gamma^(N-1-s) k[s]^T v[s], the chunked state recurrence of fwd_impl from zero.
template <typename scalar_t, typename acc_t>
void fwd_local_impl(const AttnParams& p) {
  const int64_t D = p.D, E = p.E, N = p.N;
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> K(kChunk * D), V(kChunk * E);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const Heads hd(p, h);
      Gates<acc_t> dec(p, b, h);
      acc_t* S = static_cast<acc_t*>(p.state_out) + bh * D * E;
      std::fill(S, S + D * E, acc_t(0));
      for (int64_t c0 = 0; c0 < N; c0 += kChunk) {
        const int64_t L = std::min(kChunk, N - c0);
        dec.set_chunk(c0, L);
        load_rows<scalar_t>(p.k, b, hd.k, c0, L, D, K.data());
        load_rows<scalar_t>(p.v, b, hd.v, c0, L, E, V.data());
        advance_state(dec, K.data(), V.data(), L, D, E, S);
      }
    }
  });
}

// ---------------------------------------------------------------- backward
// dq: a forward sweep with the state S of each output head (dq[t] = scale * do[t] S[t]^T, S[t] including
// position t), one task per q head over the output heads that read it (their dq summed in the acc type).
// With gates, also dg_part[t] = q[t].dq_h[t] per output head (bwd_dkdv_impl subtracts k[t].dk_h[t]).
template <typename scalar_t, typename acc_t>
void bwd_dq_impl(const AttnParams& p) {
  const int64_t D = p.D, E = p.E, N = p.N, Gq = p.H / p.Hq;
  at::parallel_for(0, p.B * p.Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(Gq * D * E), dO(kChunk * E), K(kChunk * D), V(kChunk * E), dQ(kChunk * D), dQh(kChunk * D),
        Q(kChunk * D);
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / p.Hq, hq = bq % p.Hq;
      std::vector<Gates<acc_t>> decs;
      decs.reserve(Gq);
      for (int64_t r = 0; r < Gq; ++r) {
        const int64_t h = hq * Gq + r;
        decs.emplace_back(p, b, h);
        load_state(p.state_in, (b * p.H + h) * D * E, D * E, &S[r * D * E]);
      }
      const acc_t scale = static_cast<acc_t>(p.scale);
      for (int64_t c0 = 0; c0 < N; c0 += kChunk) {
        const int64_t L = std::min(kChunk, N - c0);
        if (p.dg_part) load_rows<scalar_t>(p.q, b, hq, c0, L, D, Q.data());
        std::fill(dQ.begin(), dQ.end(), acc_t(0));
        HeadRows rows_k, rows_v;  // the k and v heads loaded for this chunk (consecutive output heads share them)
        for (int64_t r = 0; r < Gq; ++r) {
          const int64_t h = hq * Gq + r, hk = h / (p.H / p.Hkv), hv = h / (p.H / p.Hv);
          Gates<acc_t>& dec = decs[r];
          dec.set_chunk(c0, L);
          acc_t* Sh = &S[r * D * E];
          acc_t* dg = p.dg_part ? static_cast<acc_t*>(p.dg_part) + (b * p.H + h) * N : nullptr;
          load_rows<scalar_t>(p.dout, b, h, c0, L, E, dO.data());
          if (rows_k.take(hk)) load_rows<scalar_t>(p.k, b, hk, c0, L, D, K.data());
          if (rows_v.take(hv)) load_rows<scalar_t>(p.v, b, hv, c0, L, E, V.data());
          for (int64_t t = 0; t < L; ++t) {
            acc_t* dq = &dQh[t * D];
            const acc_t* dot_ = &dO[t * E];
            const acc_t w = dec.pre(t);
            for (int64_t i = 0; i < D; ++i) dq[i] = w * dot(dot_, &Sh[i * E], E);
            for (int64_t s = 0; s < t; ++s) {
              const acc_t a = dot(dot_, &V[s * E], E) * dec.w(t, s);
              const acc_t* ks = &K[s * D];
              for (int64_t i = 0; i < D; ++i) dq[i] += a * ks[i];
            }
            // dg reads q[t].dq_h[t] without the s = t term: that term, scale (q[t].k[t]) (do[t].v[t]), is also
            // in k[t].dk_h[t] (bwd_dkdv_impl leaves it out too), and the two would cancel in rounding only,
            // leaving an error of the size of the term where dg is small (strong gates).
            if (dg) dg[c0 + t] = scale * dot(&Q[t * D], dq, D);
            const acc_t a_tt = dot(dot_, &V[t * E], E);
            for (int64_t i = 0; i < D; ++i) dq[i] = (dq[i] + a_tt * K[t * D + i]) * scale;
            for (int64_t i = 0; i < D; ++i) dQ[t * D + i] += dq[i];
          }
          advance_state(dec, K.data(), V.data(), L, D, E, Sh);
        }
        store_rows<scalar_t>(p.dq, b, hq, c0, L, D, dQ.data());
      }
    }
  });
}

// dk, dv, grad_state_in: a reverse sweep per output head with
// R = suf G + scale * sum_{t>=s} w(t, s) q[t]^T do[t]; dk_h[s] = v[s] R^T, dv_h[s] = k[s] R. One task per
// block of U = lcm(H / Hkv, H / Hv) output heads: every head that reads one of the block's k or v heads is in
// it, so each task owns the rows of dk and dv it writes (summed over those heads in the acc type).
//
// With gates it also finishes dg_part (bwd_dq_impl left q[t].dq_h[t] in it, both without the s = t term):
//   dg[s] = sum_{t >= s} (q[t].dq_h[t] - k[t].dk'_h[t]) + sum_{j < s} P_G(j) + P_G(S_in),
// the decay weights that span token s: pairs of tokens (j < s <= t), pairs of a token j < s and the outgoing
// state's gradient G (P_G(j) = suf k[j] G v[j]^T, weighted to the piece's end), and the pair (S_in, G). dk'
// is dk without its G term: R is carried as R' (from the tokens) and R_G (from G) apart, so that no term
// enters dg twice with opposite signs (each would leave its rounding error where the true dg is small).
template <typename scalar_t, typename acc_t>
void bwd_dkdv_impl(const AttnParams& p) {
  const int64_t D = p.D, E = p.E, N = p.N, Gk = p.H / p.Hkv, Gv = p.H / p.Hv;
  const int64_t U = std::lcm(Gk, Gv), nk = U / Gk, nv = U / Gv;
  const bool split_g = p.dg_part && p.grad_state_out;  // R_G apart from R'
  at::parallel_for(0, p.B * (p.H / U), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> R(U * D * E), RG(split_g ? U * D * E : 0), GP(split_g ? U * N : 0), Q(kChunk * D),
        dO(kChunk * E), K(kChunk * D), V(kChunk * E), dK(nk * kChunk * D), dV(nv * kChunk * E), dKh(kChunk * D),
        dVh(kChunk * E);
    for (int64_t bu = begin; bu < end; ++bu) {
      const int64_t b = bu / (p.H / U), u = bu % (p.H / U), h0 = u * U, k0 = h0 / Gk, v0 = h0 / Gv;
      std::vector<Gates<acc_t>> decs;
      decs.reserve(U);
      for (int64_t r = 0; r < U; ++r) {
        const int64_t h = h0 + r;
        decs.emplace_back(p, b, h);
        acc_t* Rh = &R[r * D * E];
        acc_t* Gh = split_g ? &RG[r * D * E] : Rh;
        if (p.grad_state_out) {
          std::copy_n(static_cast<const acc_t*>(p.grad_state_out) + (b * p.H + h) * D * E, D * E, Gh);
        }
        if (Gh != Rh || !p.grad_state_out) std::fill(Rh, Rh + D * E, acc_t(0));
      }
      const int64_t num_chunks = (N + kChunk - 1) / kChunk;
      for (int64_t c = num_chunks - 1; c >= 0; --c) {
        const int64_t c0 = c * kChunk, L = std::min(kChunk, N - c0);
        std::fill(dK.begin(), dK.end(), acc_t(0));
        std::fill(dV.begin(), dV.end(), acc_t(0));
        HeadRows rows_q, rows_k, rows_v;  // the heads loaded for this chunk (consecutive output heads share them)
        for (int64_t r = 0; r < U; ++r) {
          const int64_t h = h0 + r, hq = h / (p.H / p.Hq), hk = h / Gk, hv = h / Gv;
          Gates<acc_t>& dec = decs[r];
          dec.set_chunk(c0, L);
          const acc_t scale = static_cast<acc_t>(p.scale);
          acc_t* Rh = &R[r * D * E];
          acc_t* RGh = split_g ? &RG[r * D * E] : nullptr;
          acc_t* dg = p.dg_part ? static_cast<acc_t*>(p.dg_part) + (b * p.H + h) * N : nullptr;
          if (rows_q.take(hq)) load_rows<scalar_t>(p.q, b, hq, c0, L, D, Q.data());
          load_rows<scalar_t>(p.dout, b, h, c0, L, E, dO.data());
          if (rows_k.take(hk)) load_rows<scalar_t>(p.k, b, hk, c0, L, D, K.data());
          if (rows_v.take(hv)) load_rows<scalar_t>(p.v, b, hv, c0, L, E, V.data());
          std::fill(dKh.begin(), dKh.end(), acc_t(0));
          std::fill(dVh.begin(), dVh.end(), acc_t(0));
          for (int64_t s = 0; s < L; ++s) {
            // Carried part: suf(s) (v[s] R^T, k[s] R).
            const acc_t w = dec.suf(s);
            acc_t* dk = &dKh[s * D];
            acc_t* dv = &dVh[s * E];
            for (int64_t i = 0; i < D; ++i) dk[i] += w * dot(&V[s * E], &Rh[i * E], E);
            for (int64_t i = 0; i < D; ++i) {
              const acc_t ki = w * K[s * D + i];
              for (int64_t j = 0; j < E; ++j) dv[j] += ki * Rh[i * E + j];
            }
            // Intra-chunk part: t > s, then (after dg's read) t = s.
            for (int64_t t = s + 1; t < L; ++t) {
              const acc_t wd = scale * dec.w(t, s);
              const acc_t a_kv = dot(&dO[t * E], &V[s * E], E) * wd;  // (do[t].v[s])
              const acc_t a_qk = dot(&Q[t * D], &K[s * D], D) * wd;   // (q[t].k[s])
              for (int64_t i = 0; i < D; ++i) dk[i] += a_kv * Q[t * D + i];
              for (int64_t j = 0; j < E; ++j) dv[j] += a_qk * dO[t * E + j];
            }
            if (dg) dg[c0 + s] -= dot(&K[s * D], dk, D);
            const acc_t a_kv = dot(&dO[s * E], &V[s * E], E) * scale;
            const acc_t a_qk = dot(&Q[s * D], &K[s * D], D) * scale;
            for (int64_t i = 0; i < D; ++i) dk[i] += a_kv * Q[s * D + i];
            for (int64_t j = 0; j < E; ++j) dv[j] += a_qk * dO[s * E + j];
            if (RGh) {  // G's term, and P_G(s) = suf k[s] G v[s]^T = k[s].(its dk term)
              acc_t pg = 0;
              for (int64_t i = 0; i < D; ++i) {
                const acc_t gi = w * dot(&V[s * E], &RGh[i * E], E);
                dk[i] += gi;
                pg += K[s * D + i] * gi;
              }
              GP[r * N + c0 + s] = pg;
              for (int64_t i = 0; i < D; ++i) {
                const acc_t ki = w * K[s * D + i];
                for (int64_t j = 0; j < E; ++j) dv[j] += ki * RGh[i * E + j];
              }
            }
          }
          acc_t* dKo = &dK[(hk - k0) * kChunk * D];
          acc_t* dVo = &dV[(hv - v0) * kChunk * E];
          for (int64_t x = 0; x < L * D; ++x) dKo[x] += dKh[x];
          for (int64_t x = 0; x < L * E; ++x) dVo[x] += dVh[x];
          // R for the previous chunk: tot R + scale * sum_t pre(t) q[t]^T do[t]; R_G: tot R_G.
          const acc_t wl = dec.tot();
          for (int64_t x = 0; x < D * E; ++x) Rh[x] *= wl;
          if (RGh) for (int64_t x = 0; x < D * E; ++x) RGh[x] *= wl;
          for (int64_t t = 0; t < L; ++t) {
            const acc_t w = scale * dec.pre(t);
            for (int64_t i = 0; i < D; ++i) {
              const acc_t qi = w * Q[t * D + i];
              for (int64_t j = 0; j < E; ++j) Rh[i * E + j] += qi * dO[t * E + j];
            }
          }
        }
        for (int64_t x = 0; x < nk; ++x) store_rows<scalar_t>(p.dk, b, k0 + x, c0, L, D, &dK[x * kChunk * D]);
        for (int64_t x = 0; x < nv; ++x) store_rows<scalar_t>(p.dv, b, v0 + x, c0, L, E, &dV[x * kChunk * E]);
      }
      for (int64_t r = 0; r < U; ++r) {
        const int64_t h = h0 + r;
        acc_t* Rh = &R[r * D * E];
        const acc_t* RGh = split_g ? &RG[r * D * E] : nullptr;
        if (p.dg_part) {
          // R_G is now exp(sum of the piece's log gates) G: the pair (S_in, G) spans every token.
          acc_t sin_g = 0;
          if (RGh && p.state_in) sin_g = dot(static_cast<const acc_t*>(p.state_in) + (b * p.H + h) * D * E, RGh, D * E);
          acc_t* dg = static_cast<acc_t*>(p.dg_part) + (b * p.H + h) * N;
          acc_t run = 0;
          for (int64_t t = N - 1; t >= 0; --t) dg[t] = run += dg[t];
          acc_t pre = 0;
          for (int64_t t = 0; t < N; ++t) {
            dg[t] += pre + sin_g;
            if (RGh) pre += GP[r * N + t];
          }
        }
        if (RGh) for (int64_t x = 0; x < D * E; ++x) Rh[x] += RGh[x];  // the whole state gradient
        if (p.grad_state_in) std::copy_n(Rh, D * E, static_cast<acc_t*>(p.grad_state_in) + (b * p.H + h) * D * E);
      }
    }
  });
}

// bwd_local: M = scale * sum_t gamma^(t+1) q[t]^T do[t], per query head.
template <typename scalar_t, typename acc_t>
void bwd_local_impl(const AttnParams& p) {
  const int64_t D = p.D, E = p.E, N = p.N;
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Q(kChunk * D), dO(kChunk * E);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      Gates<acc_t> dec(p, b, h);
      const acc_t scale = static_cast<acc_t>(p.scale);
      acc_t* M = static_cast<acc_t*>(p.grad_state_in) + bh * D * E;
      std::fill(M, M + D * E, acc_t(0));
      acc_t before = 0;  // log of the transition of the tokens before the chunk (gates)
      for (int64_t c0 = 0; c0 < N; c0 += kChunk) {
        const int64_t L = std::min(kChunk, N - c0);
        dec.set_chunk(c0, L);
        load_rows<scalar_t>(p.q, b, Heads(p, h).q, c0, L, D, Q.data());
        load_rows<scalar_t>(p.dout, b, h, c0, L, E, dO.data());
        const acc_t wc = scale * (dec.g ? std::exp(before) : std::exp(-dec.lambda * static_cast<acc_t>(c0)));
        before += dec.log_tot;
        for (int64_t t = 0; t < L; ++t) {
          const acc_t w = wc * dec.pre(t);
          for (int64_t i = 0; i < D; ++i) {
            const acc_t qi = Q[t * D + i] * w;
            acc_t* mrow = &M[i * E];
            const acc_t* dot_row = &dO[t * E];
            for (int64_t j = 0; j < E; ++j) mrow[j] += qi * dot_row[j];
          }
        }
      }
    }
  });
}

template <template <typename, typename> class F>
void dispatch(const AttnParams& params) {
  AttnParams p = params;  // head maps left unset (0): MHA / GQA (Hq = H, Hv = Hkv)
  if (p.Hq == 0) p.Hq = p.H;
  if (p.Hv == 0) p.Hv = p.Hkv;
  switch (p.dtype) {
    case ScalarType::Float32: return F<float, float>::run(p);
    case ScalarType::Float64: return F<double, double>::run(p);
    case ScalarType::Float16: return F<c10::Half, float>::run(p);
    case ScalarType::BFloat16: return F<c10::BFloat16, float>::run(p);
  }
  TORCH_CHECK(false, "lasp: unsupported dtype");
}

template <typename S, typename A> struct FwdOp { static void run(const AttnParams& p) { fwd_impl<S, A>(p); } };
template <typename S, typename A> struct FwdLocalOp { static void run(const AttnParams& p) { fwd_local_impl<S, A>(p); } };
template <typename S, typename A> struct BwdOp {
  static void run(const AttnParams& p) {
    bwd_dq_impl<S, A>(p);
    bwd_dkdv_impl<S, A>(p);  // finishes dg
  }
};
template <typename S, typename A> struct BwdLocalOp { static void run(const AttnParams& p) { bwd_local_impl<S, A>(p); } };

}  // namespace

// fwd and bwd run for N == 0 too: they still write state_out = S_in and grad_state_in = G (the local
// ones write zeros). local_ready changes nothing here: fwd and bwd are one fused pass each.
void fwd(const AttnParams& p) { dispatch<FwdOp>(p); }
void fwd_local(const AttnParams& p) { if (p.state_out) dispatch<FwdLocalOp>(p); }
void bwd(const AttnParams& p) { dispatch<BwdOp>(p); }
void bwd_local(const AttnParams& p) { if (p.grad_state_in) dispatch<BwdLocalOp>(p); }
void bwd_prepare(const AttnParams&) {}  // bwd is one fused pass here: nothing to prepare

}  // namespace cpu
}  // namespace lasp
