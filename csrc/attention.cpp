#include "attention.h"

#include <ATen/ATen.h>
#include <c10/core/SymBool.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include "exchange.h"
#include "lasp.h"
#include "ring.h"

namespace lasp {

ScalarType to_lasp(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarType::Float32;
    case at::kHalf: return ScalarType::Float16;
    case at::kBFloat16: return ScalarType::BFloat16;
    case at::kDouble: return ScalarType::Float64;
    default: TORCH_CHECK_TYPE(false, "lasp_attention: unsupported dtype ", t);
  }
}

TensorView4 view4(const Tensor& t) {
  TensorView4 v;
  v.ptr = t.data_ptr();
  for (int i = 0; i < 4; ++i) v.stride[i] = t.stride(i);
  return v;
}

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Params shared by forward and backward: sizes, dtype, q/k/v views, decay, scale.
AttnParams base_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay_acc, double scale,
                       const Tensor& g_acc = Tensor()) {
  AttnParams p;
  p.dtype = to_lasp(q.scalar_type());
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Hv = v.size(1);
  p.H = std::max(p.Hq, p.Hv);
  p.N = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.E = v.size(3);
  p.scale = scale;
  p.deterministic = at::globalContext().deterministicAlgorithms();
  p.decay = ptr_or_null(decay_acc);
  p.g = ptr_or_null(g_acc);
  p.q = view4(q);
  p.k = view4(k);
  p.v = view4(v);
  return p;
}

// The rates in the accumulation type (the caller's tensor itself when it already is: no copy). The kernels
// clamp +inf themselves (finite_rate, lasp_params.h); clamp: also here, for the ring's powers computed with
// ATen ops (gamma^n of each piece), where exp(-inf * 0) would be NaN. A NaN rate stays NaN and poisons its
// own head only, as a PyTorch op would.
Tensor decay_in_acc(const std::optional<Tensor>& decay, at::ScalarType acc, bool clamp) {
  if (!decay.has_value()) return Tensor();
  Tensor d = decay->to(acc).contiguous();
  return clamp ? d.clamp_max(1e30) : d;
}

// The sum of each (b, h)'s log gates over the piece, (B, H) (undefined without gates): the state that crosses
// the piece is scaled by exp(this - n lambda_h). -inf (a reset inside the piece) gives exactly 0.
Tensor gate_sums(const Tensor& g_acc) { return g_acc.defined() ? g_acc.sum(-1) : Tensor(); }

// With per-token gates, the terms of a backward that a cotangent G of the piece's outgoing state adds,
// applied after a main pass that ran without it (its dq, dk, dv, dg and grad_state_in are those of the
// outputs alone). With lam = g - lambda_h and suf_t = exp(sum_{u > t} lam_u) (token t seen at the end):
//   S_out = sum_t suf_t k_t^T v_t + exp(sum_u lam_u) S_in
//   dk_t += suf_t v_t G^T,   dv_t += suf_t k_t G,   grad S_in += exp(sum_u lam_u) G   (the caller's)
//   dg_s += sum_{t < s} suf_t k_t G v_t^T + exp(sum_u lam_u) <G, S_in>
// Every weight is the exp of a sum over its own range (a -inf gate, a reset, gives exact zeros), and the
// dg terms are formed from these products directly, not as differences of the large q.dq and k.dk sums
// that carry G inside a fused pass (where 16-bit state copies would lose them where dg is small). The
// products run on the tensor cores in the input dtype, against G scaled per (b, h) to at most 1 (fp16's
// range), in fp32 otherwise. dg with 0 elements (document starts, which take no gradient): dk, dv only.
// Returns exp(sum_u lam_u), (B, H) in the accumulation type.
Tensor add_gated_state_grad(const Tensor& k, const Tensor& v, const Tensor& g_acc, const Tensor& decay_acc,
                            const Tensor& G, const Tensor& s_in, const Tensor& dk, const Tensor& dv, const Tensor& dg) {
  const int64_t B = g_acc.size(0), H = g_acc.size(1), N = g_acc.size(2);
  if (N == 0) return at::ones({B, H}, G.options());
  Tensor lam = decay_acc.defined() ? g_acc - decay_acc.clamp_max(1e30).view({1, H, 1}) : g_acc;
  const Tensor incl = lam.flip(-1).cumsum(-1).flip(-1);  // sum_{u >= t}
  const Tensor suf = at::constant_pad_nd(incl.narrow(-1, 1, N - 1), {0, 1}, 0).exp();  // (B, H, N)
  const Tensor total = incl.select(-1, 0).exp();                                        // (B, H)
  auto to_out_heads = [&](const Tensor& x) {  // (B, Hx, n, X) -> (B, H, n, X), a view where Hx = H
    const int64_t hx = x.size(1), n = x.size(2);
    if (hx == H) return x;
    return x.unsqueeze(2).expand({B, hx, H / hx, n, x.size(3)}).reshape({B, H, n, x.size(3)});
  };
  const bool low = k.scalar_type() == at::kHalf || k.scalar_type() == at::kBFloat16;
  Tensor gs = low ? G.abs().amax({-2, -1}, true).clamp_min(1e-30) : Tensor();  // (B, H, 1, 1)
  const Tensor Gm = low ? (G / gs).to(k.scalar_type()) : G.to(k.scalar_type());
  const Tensor w = low ? suf.unsqueeze(-1) * gs.view({B, H, 1, 1}) : suf.unsqueeze(-1);  // (B, H, N, 1)
  // By blocks of tokens whose per-output-head temporaries stay within a budget (256 MiB of fp32
  // (B, H, n, max(D, E)); LASP_GATED_G_BLOCK_BYTES sets another), never a whole (B, H, N, D) copy.
  const char* env = std::getenv("LASP_GATED_G_BLOCK_BYTES");
  const int64_t budget = env ? std::max<int64_t>(1, std::atoll(env)) : (int64_t{256} << 20);
  const int64_t per_token = B * H * std::max(k.size(3), v.size(3)) * 4;
  const int64_t nb = std::max<int64_t>(1, budget / std::max<int64_t>(1, per_token));
  const bool want_dg = dg.numel() > 0;
  Tensor pt = want_dg ? at::empty({B, H, N}, w.options()) : Tensor();  // suf_t k_t G v_t^T
  for (int64_t t0 = 0; t0 < N; t0 += nb) {
    const int64_t n = std::min(nb, N - t0);
    const Tensor ke = to_out_heads(k.narrow(2, t0, n)), ve = to_out_heads(v.narrow(2, t0, n));
    const Tensor wb = w.narrow(2, t0, n);
    const Tensor vG = at::matmul(ve, Gm.transpose(-1, -2));  // (B, H, n, D): v_t G^T
    const Tensor kG = at::matmul(ke, Gm);                     // (B, H, n, E): k_t G
    auto add_to = [&](const Tensor& out, const Tensor& term) {  // out (B, Hx, n, X) += the sum over its group
      const int64_t hx = out.size(1);
      if (hx == H) {
        out.addcmul_(term, wb);
      } else {
        out.add_((term.to(wb.scalar_type()) * wb).view({B, hx, H / hx, n, term.size(3)}).sum(2));
      }
    };
    add_to(dk.narrow(2, t0, n), vG);
    add_to(dv.narrow(2, t0, n), kG);
    if (want_dg) pt.narrow(2, t0, n).copy_((kG.to(wb.scalar_type()) * ve.to(wb.scalar_type())).sum(-1) * wb.squeeze(-1));
  }
  if (!want_dg) return total;
  dg.add_(at::constant_pad_nd(pt.cumsum(-1).narrow(-1, 0, N - 1), {1, 0}, 0));                  // sum_{t < s}
  if (s_in.numel() > 0) dg.add_((total * (G * s_in).sum({-2, -1})).unsqueeze(-1));
  return total;
}

// An acc-type (B, H, D, E) state, H the output heads.
Tensor state_like(const Tensor& q, int64_t H, int64_t D, int64_t E) {
  return at::empty({q.size(0), H, D, E}, q.options().dtype(acc_type(q.scalar_type())));
}

// With group checks on: every rank compares what it was called with (one small all-gather). valid: false
// where this rank's own checks of the call failed (every rank raises; no field is compared).
void check_group_call(const Ring& ring, const Tensor& q, const Tensor& k, const Tensor& v, bool has_decay,
                      bool has_g, Strategy strategy, int64_t scan_nodes, int64_t pass, bool valid = true) {
  if (!ring.checks_on()) return;
  // A rank whose own checks failed sends zeros: its inputs may not even be 4-D, and no field is compared then.
  auto f = [valid](int64_t x) { return valid ? x : int64_t{0}; };
  auto size = [valid](const Tensor& t, int64_t d) { return valid ? t.size(d) : int64_t{0}; };
  ring.check_same_call({{"batch size", size(q, 0)},
                        {"q heads", size(q, 1)},
                        {"k heads", size(k, 1)},
                        {"v heads", size(v, 1)},
                        {"head dim D", size(q, 3)},
                        {"value dim E", size(v, 3)},
                        {"dtype", f(static_cast<int64_t>(q.scalar_type()))},
                        {"strategy (0 ring, 1 allgather, 2 scan)", f(static_cast<int64_t>(strategy))},
                        {"scan's ranks per node (0: one level)", f(scan_nodes)},
                        {"decay given", f(has_decay ? 1 : 0)},
                        {"g given", f(has_g ? 1 : 0)},
                        {"ring transport (0 nccl, 1 peer, 2 auto)", f(static_cast<int64_t>(ring_transport()))},
                        {"pass (0 forward, 1 backward)", f(pass)}},
                       pass == 0 ? "the forward call" : "the backward call", q.device(), valid);
}

// N == 0 (an empty piece, e.g. a rank holding no tokens): no kernel runs; the states pass through
// (state_out = S_in, grad_state_in = G) so the ring and the returned states stay exact.
Kernels empty_piece_kernels(const Tensor& q, int64_t H, int64_t D, int64_t E) {
  const auto opts = q.options().dtype(acc_type(q.scalar_type()));
  const std::vector<int64_t> shape{q.size(0), H, D, E};
  auto pass = [opts, shape](const void* in, void* out) {
    if (out == nullptr) return;
    Tensor dst = at::from_blob(out, shape, opts);
    if (in == nullptr) {
      dst.zero_();
    } else {
      dst.copy_(at::from_blob(const_cast<void*>(in), shape, opts));
    }
  };
  Kernels k{[pass](AttnParams& p) { pass(p.state_in, p.state_out); },
            [pass](AttnParams& p) { pass(nullptr, p.state_out); },
            [pass](AttnParams& p) { pass(p.grad_state_out, p.grad_state_in); },
            [pass](AttnParams& p) { pass(nullptr, p.grad_state_in); }, [](AttnParams&) {}, nullptr, nullptr, nullptr, nullptr};
  k.gates = k.head_maps = true;  // no tokens: nothing to apply (dg has 0 elements)
  return k;
}

// Whether g holds document starts (bool: True where a document starts) rather than log gates.
bool is_starts(const std::optional<Tensor>& g) { return g.has_value() && g->scalar_type() == at::kBool; }

// Whether document starts run as such (AttnParams::g_resets: the sm_90a kernels' gate mode 2, no dg): the
// default, and LASP_DOC_STARTS=1 (read at every call). LASP_DOC_STARTS=0 runs them as -inf log gates whose dg
// is computed and dropped, which is the same function.
bool starts_as_resets(const std::optional<Tensor>& g) {
  if (!is_starts(g)) return false;
  const char* env = std::getenv("LASP_DOC_STARTS");
  if (env == nullptr || env[0] == '\0') return true;
  const std::string v(env);
  TORCH_CHECK_VALUE(v == "0" || v == "1", "LASP_DOC_STARTS must be '0' or '1', got '", v, "'");
  return v == "1";
}

// The log gates in the accumulation type, contiguous (B, H, N) (the caller's tensor when it already is);
// document starts become 0 with -inf at each start.
Tensor gates_in_acc(const std::optional<Tensor>& g, at::ScalarType acc) {
  if (!g.has_value()) return Tensor();
  if (is_starts(g)) return at::zeros(g->sizes(), g->options().dtype(acc)).masked_fill_(*g, -INFINITY);
  return g->to(acc).contiguous();
}

// Before any collective, on every rank alike (the backend is the same on every rank of a group).
void check_backend_takes(const Kernels& kernels, const std::optional<Tensor>& g, const Tensor& q, const Tensor& k,
                         const Tensor& v) {
  TORCH_CHECK_NOT_IMPLEMENTED(!g.has_value() || kernels.gates, "lasp_attention: g (per-token gates) is not "
                              "supported for ", q.device().type(), " tensors yet; it runs on CPU tensors (got q on ",
                              q.device(), ")");
  const bool plain_groups = q.size(1) >= v.size(1) && v.size(1) == k.size(1);  // MHA, GQA, MQA
  TORCH_CHECK_NOT_IMPLEMENTED(plain_groups || kernels.head_maps, "lasp_attention: q, k and v with ", q.size(1), ", ",
                              k.size(1), " and ", v.size(1), " heads (v heads != k heads) are not supported for ",
                              q.device().type(), " tensors yet; they run on CPU tensors (CUDA takes q heads a "
                              "multiple of k heads = v heads)");
}

}  // namespace

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

namespace {
// decay tensors whose values were read and found valid. A model passes the same rates at every call (often
// as a new view of one buffer), and reading them off a GPU is a host sync: each is read once, and again after
// any in-place change (the version counter, which views share, moves). An entry holds its storage, so the
// memory is not reused by another tensor while it is cached; only small storages are kept. Inference
// tensors have no version counter and are read at every call.
struct SeenDecay {
  c10::Storage storage;
  const void* data = nullptr;
  int64_t numel = 0;
  int64_t version = 0;
};
constexpr size_t kSeenDecays = 8;
constexpr size_t kSeenDecayBytes = 1 << 16;
thread_local std::array<SeenDecay, kSeenDecays> seen_decays;
thread_local size_t next_seen_decay = 0;

bool cacheable_decay(const Tensor& d) {
  return !d.is_inference() && !d.device().is_cpu() && d.has_storage() && d.storage().nbytes() <= kSeenDecayBytes;
}

bool known_valid_decay(const Tensor& d) {
  if (!cacheable_decay(d)) return false;  // (the CPU reads its values without a sync)
  for (const SeenDecay& s : seen_decays) {
    if (s.data == d.const_data_ptr() && s.numel == d.numel() &&
        s.storage.unsafeGetStorageImpl() == d.storage().unsafeGetStorageImpl() && s.version == d._version())
      return true;
  }
  return false;
}

void remember_valid_decay(const Tensor& d) {
  if (!cacheable_decay(d)) return;
  seen_decays[next_seen_decay++ % kSeenDecays] = SeenDecay{d.storage(), d.const_data_ptr(), d.numel(), d._version()};
}
}  // namespace

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& decay,
                  const std::optional<Tensor>& initial_state, bool check_values, const std::optional<Tensor>& g) {
  TORCH_CHECK(q.defined() && k.defined() && v.defined(), "lasp_attention: q, k and v must be tensors");
  TORCH_CHECK_VALUE(q.dim() == 4, "lasp_attention: q must be 4-D (batch, heads, tokens, head dim), got a ",
                    q.dim(), "-D tensor of shape ", q.sym_sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "lasp_attention: k must be 4-D (batch, kv heads, tokens, head dim), got a ",
                    k.dim(), "-D tensor of shape ", k.sym_sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, "lasp_attention: v must be 4-D (batch, kv heads, tokens, value dim), got a ",
                    v.dim(), "-D tensor of shape ", v.sym_sizes());
  TORCH_CHECK_TYPE(supported_dtype(q.scalar_type()),
                   "lasp_attention: q must be float32, float16, bfloat16 or float64, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "lasp_attention: k must have the dtype of q (",
                   q.scalar_type(), "), got ", k.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), "lasp_attention: v must have the dtype of q (",
                   q.scalar_type(), "), got ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device(), "lasp_attention: k must be on the device of q (", q.device(),
                    "), got ", k.device());
  TORCH_CHECK_VALUE(v.device() == q.device(), "lasp_attention: v must be on the device of q (", q.device(),
                    "), got ", v.device());

  const auto& B = q.sym_size(0);
  const auto& Hq = q.sym_size(1);
  const auto& N = q.sym_size(2);
  const auto& D = q.sym_size(3);
  const auto& Hkv = k.sym_size(1);
  const auto& Hv = v.sym_size(1);
  const auto& E = v.sym_size(3);
  TORCH_SYM_CHECK(k.sym_size(0).sym_eq(B), "lasp_attention: k must have the batch size of q (", B, "), got ",
                  k.sym_size(0));
  TORCH_SYM_CHECK(v.sym_size(0).sym_eq(B), "lasp_attention: v must have the batch size of q (", B, "), got ",
                  v.sym_size(0));
  TORCH_SYM_CHECK(k.sym_size(2).sym_eq(N), "lasp_attention: k must have the sequence length of q (", N,
                  " tokens), got ", k.sym_size(2));
  TORCH_SYM_CHECK(v.sym_size(2).sym_eq(N), "lasp_attention: v must have the sequence length of q (", N,
                  " tokens), got ", v.sym_size(2));
  TORCH_SYM_CHECK(k.sym_size(3).sym_eq(D), "lasp_attention: k must have the head dim of q (", D, "), got ",
                  k.sym_size(3));
  TORCH_SYM_CHECK(Hq.sym_ge(1), "lasp_attention: q must have at least one head");
  TORCH_SYM_CHECK(Hkv.sym_ge(1), "lasp_attention: k must have at least one head");
  TORCH_SYM_CHECK(Hv.sym_ge(1), "lasp_attention: v must have at least one head");
  // Output heads H = max(Hq, Hv); each head count divides H (MHA, GQA, MQA, and GVA: Hq = Hk < Hv).
  const c10::SymInt H = out_heads(q, v);
  TORCH_SYM_CHECK((H % Hq).sym_eq(0) & (H % Hv).sym_eq(0), "lasp_attention: the number of q heads (", Hq,
                  ") and the number of v heads (", Hv, ") must divide each other (the output has the larger, H = ", H,
                  ")");
  TORCH_SYM_CHECK((H % Hkv).sym_eq(0), "lasp_attention: the number of k heads (", Hkv,
                  ") must divide the number of output heads H = max(q heads, v heads) = ", H);
  TORCH_SYM_CHECK(D.sym_ge(1), "lasp_attention: q must have a head dim of at least 1");
  TORCH_SYM_CHECK(E.sym_ge(1), "lasp_attention: v must have a head dim of at least 1");

  if (decay.has_value()) {
    const Tensor& d = *decay;
    TORCH_CHECK_VALUE(d.dim() == 1, "lasp_attention: decay must be 1-D with one rate per output head (H = ", H,
                      "), got shape ", d.sym_sizes());
    TORCH_SYM_CHECK(d.sym_size(0).sym_eq(H), "lasp_attention: decay must have one rate per output head (H = ", H,
                    "), got ", d.sym_size(0));
    TORCH_CHECK_TYPE(at::isFloatingType(d.scalar_type()), "lasp_attention: decay must be a floating tensor, got ",
                     d.scalar_type());
    TORCH_CHECK_VALUE(d.device() == q.device(), "lasp_attention: decay must be on the device of q (", q.device(),
                      "), got ", d.device());
    if (check_values && get_value_checks() && d.numel() > 0 && !known_valid_decay(d)) {
      // (a NaN rate is not an error: like other non-finite inputs it propagates, to its own head)
      const at::Tensor neg = (d < 0).nonzero();
      if (neg.size(0) > 0) {  // the first negative rate, by head
        const int64_t h0 = neg[0][0].item<int64_t>();
        TORCH_CHECK_VALUE(false, "lasp_attention: decay must hold rates >= 0 (gamma = exp(-decay) <= 1), got decay[",
                          h0, "] = ", d[h0].item<double>());
      }
      remember_valid_decay(d);
    }
  }
  if (g.has_value()) {
    const Tensor& gt = *g;
    TORCH_CHECK_VALUE(gt.dim() == 3, "lasp_attention: g must be 3-D, one log gate per (batch, output head, token): shape "
                      "(B, H, N) = (", B, ", ", H, ", ", N, ") for layout 'bhnd' ((B, N, H) for 'bnhd'), got shape ",
                      gt.sym_sizes());
    TORCH_CHECK_VALUE((gt.sym_size(0).sym_eq(B) & gt.sym_size(1).sym_eq(H) & gt.sym_size(2).sym_eq(N))
                          .guard_bool(__FILE__, __LINE__),
                      "lasp_attention: g must have shape (B, H, N) = (", B, ", ", H, ", ", N, ") for layout 'bhnd' "
                    "((B, N, H) for 'bnhd'), got shape ", gt.sym_sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(gt.scalar_type()) || gt.scalar_type() == at::kBool,
                     "lasp_attention: g must be a floating tensor (log gates) or bool (document starts), got ",
                     gt.scalar_type());
    TORCH_CHECK_VALUE(gt.device() == q.device(), "lasp_attention: g must be on the device of q (", q.device(),
                      "), got ", gt.device());
  }
  if (initial_state.has_value()) {
    const Tensor& s = *initial_state;
    const auto acc = acc_type(q.scalar_type());
    TORCH_CHECK_TYPE(s.scalar_type() == acc, "lasp_attention: initial_state must be ", acc, " for ",
                     q.scalar_type(), " inputs, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.device() == q.device(), "lasp_attention: initial_state must be on the device of q (",
                      q.device(), "), got ", s.device());
    TORCH_CHECK_VALUE(s.dim() == 4, "lasp_attention: initial_state must have shape (B, H, D, E) = (", B, ", ", H,
                      ", ", D, ", ", E, "), got ", s.sym_sizes());
    TORCH_SYM_CHECK(s.sym_size(0).sym_eq(B) & s.sym_size(1).sym_eq(H) & s.sym_size(2).sym_eq(D) &
                        s.sym_size(3).sym_eq(E),
                    "lasp_attention: initial_state must have shape (B, H, D, E) = (", B, ", ", H, ", ", D, ", ",
                    E, "), got ", s.sym_sizes());
  }
}

namespace {
// Whether alloc_out lays (B, H, N, last) out as (B, N, H, last) in memory: like's tokens outside its heads.
bool tokens_outer(const Tensor& like) { return like.sym_stride(1) < like.sym_stride(2); }
}  // namespace

const Tensor& out_layout_like(const Tensor& q, const Tensor& v) {
  return v.sym_size(1) > q.sym_size(1) ? v : q;
}

c10::SymInt out_heads(const Tensor& q, const Tensor& v) { return q.sym_size(1).max(v.sym_size(1)); }

Tensor alloc_out(const Tensor& like, const c10::SymInt& H, const c10::SymInt& last) {
  return alloc_out(like, H, last, like.options());
}

Tensor alloc_out(const Tensor& like, const c10::SymInt& H, const c10::SymInt& last, const at::TensorOptions& opts) {
  const auto& B = like.sym_size(0);
  const auto& N = like.sym_size(2);
  if (tokens_outer(like)) {
    return at::empty_symint({B, N, H, last}, opts).transpose(1, 2);
  }
  return at::empty_symint({B, H, N, last}, opts);
}

namespace {

std::array<SplitFn, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>& split_registry() {
  static std::array<SplitFn, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> fns{};
  return fns;
}

// An address as aligned as the forward's freshly allocated o (the CUDA caching allocator hands out 512-byte
// aligned blocks; the tensor-core kernels ask for 16): forward_split stands in for o with it (never read).
constexpr uintptr_t kFreshAlignment = 256;

}  // namespace

bool register_split(c10::DeviceType type, SplitFn fn) {
  split_registry().at(static_cast<size_t>(type)) = fn;
  return true;
}

namespace {
std::array<DeferredBadFn, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>& bad_registry() {
  static std::array<DeferredBadFn, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> fns{};
  return fns;
}
}  // namespace

bool register_deferred_bad_value(c10::DeviceType type, DeferredBadFn fn) {
  bad_registry().at(static_cast<size_t>(type)) = fn;
  return true;
}

DeferredBad deferred_bad_value(const Tensor& x) {
  if (x.numel() == 0) return [] { return 0.0; };
  if (const DeferredBadFn fn = bad_registry().at(static_cast<size_t>(x.device().type()))) return fn(x);
  const double m = x.max().item<double>();  // max propagates NaN
  return [m] { return m; };
}

void check_gate_value(const char* op, double bad) {
  TORCH_CHECK_VALUE(!std::isnan(bad), op, ": g must hold log gates <= 0 (-inf: a reset), got NaN");
  TORCH_CHECK_VALUE(bad <= 0, op, ": g must hold log gates <= 0 (-inf: a reset), got a value > 0");
}

bool forward_split(const Tensor& q, const Tensor& k, const Tensor& v, bool gated, int64_t* nseg, int64_t* seglen) {
  check_inputs(q, k, v, std::nullopt, std::nullopt, /*check_values=*/false);
  const SplitFn fn = split_registry().at(static_cast<size_t>(q.device().type()));
  if (fn == nullptr || q.size(2) == 0) return false;  // N = 0: the forward runs no kernel (no segments)
  AttnParams p = base_params(q, k, v, Tensor(), 1.0);
  // o as the forward op allocates it (alloc_out's layout; no tensor made, no op dispatched).
  const int64_t H = p.H, N = q.size(2), E = v.size(3);
  const std::array<int64_t, 4> o_strides = tokens_outer(out_layout_like(q, v)) ? std::array<int64_t, 4>{N * H * E, E, H * E, 1}
                                                           : std::array<int64_t, 4>{H * N * E, N * E, E, 1};
  for (int i = 0; i < 4; ++i) p.o.stride[i] = o_strides[i];
  p.o.ptr = reinterpret_cast<void*>(kFreshAlignment);
  // gates change the plan (which families take the passes): stand in for them too (never read)
  if (gated) p.g = reinterpret_cast<const void*>(kFreshAlignment);
  return fn(q.device(), p, /*backward=*/false, nseg, seglen);
}

void check_seg_split_args(int64_t seg_nseg, int64_t seg_seglen) {
  TORCH_CHECK_VALUE(seg_nseg >= 0, "lasp_attention_fwd: seg_nseg must be >= 0 (the forward's number of segments, "
                    "or 0: keep no segment states), got ", seg_nseg);
  TORCH_CHECK_VALUE(seg_seglen >= 0, "lasp_attention_fwd: seg_seglen must be >= 0 (the forward's segment length, "
                    "or 0: keep no segment states), got ", seg_seglen);
}

void check_seg_states(const Tensor& q, const Tensor& v, const std::optional<Tensor>& seg_states,
                      int64_t seg_seglen) {
  TORCH_CHECK_VALUE(seg_seglen >= 0, "lasp_attention_bwd: seg_seglen must be >= 0 (the forward's segment length, "
                    "or 0 without segment states), got ", seg_seglen);
  if (!seg_states.has_value()) return;
  const Tensor& s = *seg_states;
  const auto acc = acc_type(q.scalar_type());
  TORCH_CHECK_TYPE(s.scalar_type() == acc, "lasp_attention_bwd: seg_states must be ", acc, " (the forward's fourth "
                   "output) for ", q.scalar_type(), " inputs, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.device() == q.device(), "lasp_attention_bwd: seg_states must be on the device of q (",
                    q.device(), "), got ", s.device());
  if (s.dim() == 1 && s.sym_numel() == 0) return;  // the forward kept none
  const auto &B = q.sym_size(0), &D = q.sym_size(3), &E = v.sym_size(3);
  const c10::SymInt H = out_heads(q, v);
  TORCH_CHECK_VALUE(s.dim() == 5, "lasp_attention_bwd: seg_states must be the forward's fourth output, of shape "
                    "(B, H, nseg, D, E) = (", B, ", ", H, ", nseg, ", D, ", ", E, ") or with 0 elements (none kept), "
                    "got shape ", s.sym_sizes());
  TORCH_CHECK_VALUE((s.sym_size(0).sym_eq(B) & s.sym_size(1).sym_eq(H) & s.sym_size(2).sym_ge(1) &
                     s.sym_size(3).sym_eq(D) & s.sym_size(4).sym_eq(E))
                        .guard_bool(__FILE__, __LINE__),
                    "lasp_attention_bwd: seg_states must be the forward's fourth output, of shape (B, H, nseg, D, E) = (",
                    B, ", ", H, ", nseg >= 1, ", D, ", ", E, ") or with 0 elements (none kept), got shape ",
                    s.sym_sizes());
  TORCH_CHECK_VALUE(seg_seglen >= 1, "lasp_attention_bwd: seg_seglen must be the forward's segment length (>= 1) "
                    "when seg_states are given, got ", seg_seglen);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_fwd(const Kernels& backend_kernels, const Tensor& q,
                                                         const Tensor& k, const Tensor& v,
                                                         const std::optional<Tensor>& decay, double scale,
                                                         const std::optional<Tensor>& initial_state,
                                                         const std::optional<std::string>& group_name,
                                                         const std::string& strategy_name, int64_t seg_nseg,
                                                         int64_t seg_seglen, const std::optional<Tensor>& g) {
  // The rank's own checks first (shapes, dtypes, values of decay and g). Under group checks a failure travels
  // with the call's description, so that every rank raises (this rank why, the others which ranks failed)
  // instead of the others waiting at a collective for the rank that raised.
  const Ring ring(group_name);
  const bool agree = ring.size() > 1 && ring.checks_on();
  std::exception_ptr local_err;
  Strategy strategy{};
  int64_t scan_nodes = 0;
  // g's values: a look at them is queued here and read once this rank's kernels are queued (alone) or before
  // the exchange (under a group), so no host sync precedes them (attention.h, deferred_bad_value); under
  // group checks, at once, with the other checks.
  DeferredBad gate_bad;
  try {
    check_inputs(q, k, v, decay, initial_state, /*check_values=*/true, g);
    check_seg_split_args(seg_nseg, seg_seglen);
    TORCH_CHECK_VALUE(seg_nseg <= 1 || ring.size() == 1, "lasp_attention_fwd: seg_nseg > 1 keeps the segment "
                      "states of a call on one rank; across the ", ring.size(), " ranks of group '", ring.group_name(),
                      "' the backward computes them again: pass seg_nseg = 0, got seg_nseg = ", seg_nseg);
    check_backend_takes(backend_kernels, g, q, k, v);
    strategy = parse_strategy(strategy_name);
    scan_nodes = scan_node_size(strategy_name);
    if (get_value_checks() && g.has_value() && g->scalar_type() != at::kBool) gate_bad = deferred_bad_value(*g);
    if (agree && gate_bad) {
      check_gate_value("lasp_attention", gate_bad());
      gate_bad = DeferredBad();
    }
  } catch (const c10::Error&) {
    if (!agree) throw;
    local_err = std::current_exception();
  }
  if (agree) {
    try {
      check_group_call(ring, q, k, v, decay.has_value(), g.has_value(), strategy, scan_nodes, 0, !local_err);
    } catch (const c10::Error&) {
      if (local_err) std::rethrow_exception(local_err);
      throw;
    }
    TORCH_INTERNAL_ASSERT(!local_err, "lasp_attention: the group check passed a rank whose own checks failed");
  }
  auto check_gates = [&] {
    if (gate_bad) check_gate_value("lasp_attention", gate_bad());
  };
  const auto acc = acc_type(q.scalar_type());
  const int64_t N = q.size(2), D = q.size(3), E = v.size(3), H = out_heads(q, v).expect_int();
  const Kernels kernels = N == 0 ? empty_piece_kernels(q, H, D, E) : backend_kernels;
  Tensor seg_states = at::empty({0}, q.options().dtype(acc));  // none kept
  const Tensor decay_acc = decay_in_acc(decay, acc, /*clamp=*/ring.size() > 1);
  const Tensor g_acc = gates_in_acc(g, acc);
  Tensor o = alloc_out(out_layout_like(q, v), H, E);
  AttnParams p = base_params(q, k, v, decay_acc, scale, g_acc);
  p.g_resets = starts_as_resets(g);
  p.o = view4(o);

  if (ring.size() == 1) {
    // Alone: the incoming state is the user's initial state; one fused pass.
    // A copy, not a view: the op's outputs never alias its inputs (the saved state is an output).
    // No initial state: a 0-element state_in (zero; attention.h) without a group, zeros under a group of
    // one rank (the shape fwd_meta gives either way).
    Tensor s_in = fwd_saves_no_state(initial_state, group_name) ? at::empty({0}, q.options().dtype(acc))
                  : initial_state.has_value() ? initial_state->clone(at::MemoryFormat::Contiguous)
                                              : at::zeros_like(state_like(q, H, D, E));
    Tensor s_out = state_like(q, H, D, E);
    p.state_in = initial_state.has_value() ? s_in.data_ptr() : nullptr;
    p.state_out = s_out.data_ptr();
    Tensor ws;
    if (seg_nseg > 1) {  // keep the segment input states: the front of the workspace (lasp_cuda.h, fwd_split)
      int64_t nseg = 0, seglen = 0;
      const bool known = kernels.split && kernels.workspace && kernels.split(p, false, &nseg, &seglen);
      TORCH_CHECK_VALUE(known, "lasp_attention_fwd: seg_nseg > 1 asks to keep the segment states, but the forward of "
                        "this call on ", q.device(), " cuts no segments (no segment split for these inputs): pass "
                        "seg_nseg = 0; got seg_nseg = ", seg_nseg, ", seg_seglen = ", seg_seglen);
      TORCH_CHECK_VALUE(nseg == seg_nseg && seglen == seg_seglen, "lasp_attention_fwd: seg_nseg, seg_seglen must be "
                        "the forward's split of this call, (", nseg, ", ", seglen, ") (or seg_nseg = 0: keep none), "
                        "got (", seg_nseg, ", ", seg_seglen, ")");
      ws = kernels.workspace(p, /*backward=*/false);
      const int64_t numel = q.size(0) * H * nseg * D * E;
      const int64_t bytes = numel * static_cast<int64_t>(acc_size(p.dtype));
      TORCH_INTERNAL_ASSERT(ws.defined() && ws.numel() >= bytes, "lasp_attention_fwd: the forward's workspace (",
                            ws.defined() ? ws.numel() : 0, " bytes) is smaller than its ", bytes,
                            " bytes of segment states");
      seg_states = ws.narrow(0, 0, bytes).view(acc).view({q.size(0), H, nseg, D, E});
    }
    kernels.fwd(p);
    check_gates();
    return {o, s_out, s_in, seg_states};
  }

  // Several ranks (exchange.h): the local state L_r (reads k and v only), the exchange that gives the
  // incoming state S_in, then the main pass with S_in, as on one device.
  const Tensor ws = kernels.workspace ? kernels.workspace(p, /*backward=*/false) : Tensor();
  Tensor local = state_like(q, H, D, E);
  p.state_out = local.data_ptr();
  kernels.fwd_local(p);  // L_r
  check_gates();
  const ForwardStates st =
      make_exchange(backend_kernels, ring, strategy, q, D, E, decay_acc, N, gate_sums(g_acc), scan_nodes)
          ->forward(local, initial_state);
  p.state_in = st.zero_in ? nullptr : st.s_in.data_ptr();
  p.state_out = nullptr;
  p.local_ready = true;
  // Across ranks the backward computes the segment states again (bwd_prepare, beside the gradient
  // exchange): they are kept on one rank only (seg_nseg > 1 raised above).
  kernels.fwd(p);  // o, with the incoming state
  return {o, st.s_out, st.s_in, seg_states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd(const Kernels& backend_kernels, const Tensor& q,
                                                         const Tensor& k, const Tensor& v, const Tensor& dout,
                                                         const std::optional<Tensor>& grad_final_state,
                                                         const std::optional<Tensor>& decay, double scale,
                                                         const Tensor& state_in,
                                                         const std::optional<std::string>& group_name,
                                                         const std::string& strategy_name,
                                                         const std::optional<Tensor>& seg_states,
                                                         int64_t seg_seglen, const std::optional<Tensor>& g) {
  check_inputs(q, k, v, decay, std::nullopt, /*check_values=*/false, g);
  check_seg_states(q, v, seg_states, seg_seglen);
  check_backend_takes(backend_kernels, g, q, k, v);
  const bool seg_given = seg_states.has_value() && seg_states->numel() > 0;
  const Strategy strategy = parse_strategy(strategy_name);
  const int64_t scan_nodes = scan_node_size(strategy_name);
  const auto acc = acc_type(q.scalar_type());
  const int64_t N = q.size(2), D = q.size(3), E = v.size(3), H = out_heads(q, v).expect_int();
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({q.size(0), H, N, E}) && dout.scalar_type() == q.scalar_type(),
              "lasp_attention backward: the output gradient must have shape ", at::IntArrayRef({q.size(0), H, N, E}),
              " and dtype ", q.scalar_type(), ", got ", dout.sizes(), " ", dout.scalar_type());
  TORCH_CHECK_VALUE(state_in.numel() == 0 || state_in.sizes() == at::IntArrayRef({q.size(0), H, D, E}),
                    "lasp_attention backward: state_in must be the forward's third output, of shape (B, H, D, E) = ",
                    at::IntArrayRef({q.size(0), H, D, E}), " or with 0 elements (no incoming state), got ",
                    state_in.sizes());
  TORCH_CHECK_VALUE(state_in.numel() == 0 || state_in.device() == q.device(),
                    "lasp_attention backward: state_in must be on the device of q (", q.device(), "), got ",
                    state_in.device());
  const Kernels kernels = N == 0 ? empty_piece_kernels(q, H, D, E) : backend_kernels;
  const Ring ring(group_name);
  // Before any collective, so that every rank of a call made alike raises here.
  TORCH_CHECK_VALUE(!seg_given || ring.size() == 1, "lasp_attention_bwd: seg_states are the segment states a "
                    "forward on one rank kept; across the ", ring.size(), " ranks of group '", ring.group_name(),
                    "' none are kept (the backward computes them): pass seg_states = None, got a tensor of shape ",
                    seg_states->sizes());
  const Tensor decay_acc = decay_in_acc(decay, acc, /*clamp=*/ring.size() > 1);
  const Tensor g_acc = gates_in_acc(g, acc);
  const Tensor s_in = state_in.to(acc).contiguous();  // 0 elements: a zero incoming state
  const Tensor g_user = grad_final_state.has_value() ? grad_final_state->to(acc).contiguous() : Tensor();

  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  // dg: written by the main pass (bwd), which has S_in and G_r. Document starts take none: returned with 0
  // elements, and not computed where they run as such (starts_as_resets).
  const bool resets = starts_as_resets(g);
  Tensor dg_work = g.has_value() && !resets ? at::empty({q.size(0), H, N}, q.options().dtype(acc)) : Tensor();
  const Tensor dg = g.has_value() && !is_starts(g) ? dg_work : at::empty({0}, q.options().dtype(acc));
  AttnParams p = base_params(q, k, v, decay_acc, scale, g_acc);
  p.dg_part = ptr_or_null(dg_work);
  p.g_resets = resets;
  p.dout = view4(dout);
  p.dq = view4(dq);
  p.dk = view4(dk);
  p.dv = view4(dv);
  p.state_in = s_in.numel() > 0 ? s_in.data_ptr() : nullptr;
  // Every backward call below runs without an outgoing-state gradient: alone, with none given, and with
  // gates always (add_gated_state_grad adds G's terms after it). Set before any plan is asked for: the
  // kernels may plan on it (lasp_params.h).
  const bool gated = g.has_value();
  p.no_state_grad = gated || (ring.size() == 1 && !g_user.defined());
  Tensor seg_in;  // the forward's segment states where the backward cuts the sequence alike (else recomputed)
  if (seg_given && kernels.split) {
    p.kept_nseg = seg_states->size(2);  // the plan leans toward the forward's split (kernels/plan.h)
    int64_t nseg = 0, seglen = 0;
    if (kernels.split(p, true, &nseg, &seglen) && nseg > 1 && nseg == seg_states->size(2) && seglen == seg_seglen) {
      seg_in = seg_states->contiguous();  // the forward's output is; a copy for any other layout
      p.seg_states = seg_in.data_ptr();
    }
  }

  check_group_call(ring, q, k, v, decay.has_value(), g.has_value(), strategy, scan_nodes, 1);
  if (gated) {
    // The main pass without G: dq, dk, dv, dg of the outputs and M_r (grad_state_in), with S_in. Alone, G
    // is the gradient of the returned final state; across ranks the exchange gives G_r from M_r and the
    // later pieces (its grad S_in is exp(sum lam) G_r + M_r). Then G's terms.
    Tensor m = state_like(q, H, D, E);
    p.grad_state_out = nullptr;
    p.grad_state_in = m.data_ptr();
    kernels.bwd(p);
    if (ring.size() == 1) {
      if (!g_user.defined()) return {dq, dk, dv, m, dg};
      const Tensor total = add_gated_state_grad(k, v, g_acc, decay_acc, g_user, s_in, dk, dv, dg);
      return {dq, dk, dv, m + total.view({q.size(0), H, 1, 1}) * g_user, dg};
    }
    const BackwardStates st =
        make_exchange(backend_kernels, ring, strategy, q, D, E, decay_acc, N, gate_sums(g_acc), scan_nodes)
            ->backward(m, g_user, [] {});
    if (st.g.defined()) add_gated_state_grad(k, v, g_acc, decay_acc, st.g, s_in, dk, dv, dg);
    Tensor grad_init = ring.is_first() ? st.g_prev : at::zeros_like(st.g_prev);
    return {dq, dk, dv, grad_init, dg};
  }
  if (ring.size() == 1) {
    // Alone: G is the gradient of the returned final state; one fused pass.
    Tensor grad_init = state_like(q, H, D, E);
    p.grad_state_out = ptr_or_null(g_user);
    p.grad_state_in = grad_init.data_ptr();
    kernels.bwd(p);
    return {dq, dk, dv, grad_init, dg};
  }

  // Several ranks, the mirror of the forward (exchange.h): the local M_r (reads q and dout only), the
  // exchange that gives G_r, the gradient w.r.t. this piece's outgoing state (with U_r, the gradient of
  // the state this rank returned, folded in), then the main pass with G_r. bwd_prepare (the rest of the
  // work that needs neither G nor M) runs during the exchange, beside the communication where it can.
  const Tensor ws = kernels.workspace ? kernels.workspace(p, /*backward=*/true) : Tensor();
  Tensor m = state_like(q, H, D, E);
  p.grad_state_in = m.data_ptr();
  kernels.bwd_local(p);  // M_r
  p.grad_state_in = nullptr;
  const BackwardStates st =
      make_exchange(backend_kernels, ring, strategy, q, D, E, decay_acc, N, gate_sums(g_acc), scan_nodes)
          ->backward(m, g_user, [&] { kernels.bwd_prepare(p); });
  p.grad_state_out = ptr_or_null(st.g);
  p.local_ready = true;
  kernels.bwd(p);  // dq, dk, dv with G_r
  // Only the first piece reads the user's initial state.
  Tensor grad_init = ring.is_first() ? st.g_prev : at::zeros_like(st.g_prev);
  return {dq, dk, dv, grad_init, dg};
}

}  // namespace lasp
