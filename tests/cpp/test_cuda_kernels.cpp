// GoogleTest of the lasp CUDA kernels (kernels/lasp_cuda.h), driven directly through AttnParams.
// Every output is compared with a float64 CPU reference computed here from the state recurrences
// (docs/design.md): S[t] = g S[t-1] + k[t]^T v[t] (S[-1] = S_in), o[t] = scale q[t] S[t];
// R[s] = g R[s+1] + scale q[s]^T do[s] (R at N-1 starts from G), dq[t] = scale do[t] S[t]^T,
// dk[s] = v[s] R[s]^T, dv[s] = k[s] R[s], grad_state_in = g R[0].
// Inputs are fresh random numbers every run (the seed is printed on failure); outputs are poisoned with NaN.
#include <gtest/gtest.h>

#if defined(LASP_WITH_CUDA)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "fast_args.h"
#include "launch_cache.h"
#include "lasp_cuda.h"
#include "plan.h"

namespace {

using lasp::AttnParams;
using lasp::ScalarType;
using lasp::TensorView4;

bool have_device(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    *why = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(e);
    cudaGetLastError();
    return false;
  }
  if (n == 0) {
    *why = "cudaGetDeviceCount returned 0";
    return false;
  }
  return true;
}

#define SKIP_WITHOUT_DEVICE()                                               \
  do {                                                                      \
    std::string why__;                                                      \
    if (!have_device(&why__)) GTEST_SKIP() << "no CUDA device: " << why__;  \
  } while (0)

#define CK(expr)                                                                              \
  do {                                                                                        \
    cudaError_t e__ = (expr);                                                                 \
    ASSERT_EQ(e__, cudaSuccess) << #expr << ": " << cudaGetErrorString(e__);                  \
  } while (0)

size_t elem_size(ScalarType t) {
  switch (t) {
    case ScalarType::Float32: return 4;
    case ScalarType::Float64: return 8;
    default: return 2;
  }
}
const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float32: return "f32";
    case ScalarType::Float16: return "f16";
    case ScalarType::BFloat16: return "bf16";
    default: return "f64";
  }
}

// Round a double to what the dtype holds.
double quantize(double x, ScalarType t) {
  switch (t) {
    case ScalarType::Float32: return (double)(float)x;
    case ScalarType::Float16: return (double)__half2float(__float2half_rn((float)x));
    case ScalarType::BFloat16: return (double)__bfloat162float(__float2bfloat16_rn((float)x));
    default: return x;
  }
}
void store_elem(void* base, int64_t i, double x, ScalarType t) {
  switch (t) {
    case ScalarType::Float32: static_cast<float*>(base)[i] = (float)x; break;
    case ScalarType::Float16: static_cast<__half*>(base)[i] = __float2half_rn((float)x); break;
    case ScalarType::BFloat16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn((float)x); break;
    default: static_cast<double*>(base)[i] = x;
  }
}
double load_elem(const void* base, int64_t i, ScalarType t) {
  switch (t) {
    case ScalarType::Float32: return static_cast<const float*>(base)[i];
    case ScalarType::Float16: return __half2float(static_cast<const __half*>(base)[i]);
    case ScalarType::BFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const double*>(base)[i];
  }
}

struct DevBuf {
  void* p = nullptr;
  size_t bytes = 0;
  DevBuf() = default;
  explicit DevBuf(size_t n) : bytes(n) {
    if (n && cudaMalloc(&p, n) != cudaSuccess) p = nullptr;
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    if (this != &o) {
      if (p) cudaFree(p);
      p = o.p;
      bytes = o.bytes;
      o.p = nullptr;
    }
    return *this;
  }
  ~DevBuf() {
    if (p) cudaFree(p);
  }
};

// Layouts of a logical (B, Hx, N, X) tensor.
enum Layout { kBHNX = 0, kBNHX = 1, kStridedLast = 2 };
const char* layout_name(int l) { return l == kBHNX ? "BHNX" : l == kBNHX ? "BNHX" : "strided-last"; }

// A logical (B, Hx, N, X) tensor: host values (double, already quantized) + a device copy in a layout.
struct Tensor {
  int64_t B, Hx, N, X;
  std::vector<double> h;  // logical, contiguous (B, Hx, N, X)
  int64_t st[4];
  int64_t storage = 0;
  DevBuf dev;
  ScalarType t;
  Tensor(int64_t B_, int64_t Hx_, int64_t N_, int64_t X_, int layout, ScalarType t_)
      : B(B_), Hx(Hx_), N(N_), X(X_), h(B_ * Hx_ * N_ * X_), t(t_) {
    if (layout == kBHNX) {
      st[0] = Hx * N * X; st[1] = N * X; st[2] = X; st[3] = 1;
      storage = B * Hx * N * X;
    } else if (layout == kBNHX) {
      st[0] = N * Hx * X; st[1] = X; st[2] = Hx * X; st[3] = 1;
      storage = B * N * Hx * X;
    } else {
      const int64_t row = 2 * X + 1;
      st[0] = Hx * N * row; st[1] = N * row; st[2] = row; st[3] = 2;
      storage = B * Hx * N * row;
    }
    dev = DevBuf(storage * elem_size(t));
  }
  int64_t li(int64_t b, int64_t hh, int64_t n, int64_t x) const { return ((b * Hx + hh) * N + n) * X + x; }
  int64_t si(int64_t b, int64_t hh, int64_t n, int64_t x) const { return b * st[0] + hh * st[1] + n * st[2] + x * st[3]; }
  TensorView4 view() const {
    TensorView4 v;
    v.ptr = dev.p;
    for (int i = 0; i < 4; ++i) v.stride[i] = st[i];
    return v;
  }
  void randomize(std::mt19937_64& rng, double amp) {
    std::uniform_real_distribution<double> U(-amp, amp);
    for (auto& x : h) x = quantize(U(rng), t);
  }
  // Upload the logical values; gaps of the storage get NaN.
  void upload() {
    std::vector<unsigned char> buf(storage * elem_size(t));
    for (int64_t i = 0; i < storage; ++i) store_elem(buf.data(), i, std::numeric_limits<double>::quiet_NaN(), t);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hh = 0; hh < Hx; ++hh)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t x = 0; x < X; ++x) store_elem(buf.data(), si(b, hh, n, x), h[li(b, hh, n, x)], t);
    cudaMemcpy(dev.p, buf.data(), buf.size(), cudaMemcpyHostToDevice);
  }
  void poison() {
    for (auto& x : h) x = std::numeric_limits<double>::quiet_NaN();
    upload();
  }
  std::vector<double> download() const {
    std::vector<unsigned char> buf(storage * elem_size(t));
    cudaMemcpy(buf.data(), dev.p, buf.size(), cudaMemcpyDeviceToHost);
    std::vector<double> out(h.size());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hh = 0; hh < Hx; ++hh)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t x = 0; x < X; ++x) out[li(b, hh, n, x)] = load_elem(buf.data(), si(b, hh, n, x), t);
    return out;
  }
};

// States: contiguous (B, H, D, E) in the acc type.
struct State {
  std::vector<double> h;
  DevBuf dev;
  bool dbl;
  State(size_t n, bool dbl_) : h(n), dev(n * (dbl_ ? 8 : 4)), dbl(dbl_) {}
  void upload() {
    if (dbl) {
      cudaMemcpy(dev.p, h.data(), h.size() * 8, cudaMemcpyHostToDevice);
    } else {
      std::vector<float> f(h.begin(), h.end());
      cudaMemcpy(dev.p, f.data(), f.size() * 4, cudaMemcpyHostToDevice);
    }
  }
  void randomize(std::mt19937_64& rng, double amp) {
    std::uniform_real_distribution<double> U(-amp, amp);
    for (auto& x : h) x = dbl ? U(rng) : (double)(float)U(rng);
    upload();
  }
  void poison() {
    for (auto& x : h) x = std::numeric_limits<double>::quiet_NaN();
    upload();
  }
  std::vector<double> download() const {
    std::vector<double> out(h.size());
    if (dbl) {
      cudaMemcpy(out.data(), dev.p, out.size() * 8, cudaMemcpyDeviceToHost);
    } else {
      std::vector<float> f(h.size());
      cudaMemcpy(f.data(), dev.p, f.size() * 4, cudaMemcpyDeviceToHost);
      for (size_t i = 0; i < f.size(); ++i) out[i] = f[i];
    }
    return out;
  }
};

double rel_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = got[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  if (!std::isfinite(num)) return std::numeric_limits<double>::infinity();
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

double tol_for(ScalarType t) {
  switch (t) {
    case ScalarType::Float32: return 1e-5;
    case ScalarType::Float16: return 5e-3;
    case ScalarType::BFloat16: return 2e-2;
    default: return 1e-11;
  }
}

struct Case {
  ScalarType dt;
  int B, H, Hkv, N, D, E;
  bool decay;
  int layout;
  bool with_state_in, with_grad_out, want_state_out, want_grad_in;
  std::string str() const {
    std::ostringstream s;
    s << dtype_name(dt) << " B" << B << " H" << H << " Hkv" << Hkv << " N" << N << " D" << D << " E" << E
      << (decay ? " decay" : " nodecay") << " " << layout_name(layout) << " Sin=" << with_state_in
      << " G=" << with_grad_out << " Sout=" << want_state_out << " dSin=" << want_grad_in;
    return s.str();
  }
};

uint64_t fresh_seed() {
  std::random_device rd;
  return ((uint64_t)rd() << 32) ^ rd() ^ (uint64_t)std::chrono::high_resolution_clock::now().time_since_epoch().count();
}

// Run fwd and bwd of one case on the device and compare every output with the float64 reference.
// split: the ring's order instead, fwd_local then fwd with local_ready (bwd_local, bwd_prepare, then bwd), sharing a
// poisoned workspace; L and M are checked too.
void run_case(const Case& cs, bool split) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cs.str() + (split ? " split" : "") + " seed=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int B = cs.B, H = cs.H, Hkv = cs.Hkv, N = cs.N, D = cs.D, E = cs.E, grp = H / Hkv;
  const bool dbl = cs.dt == ScalarType::Float64;
  const double scale = 1.0 / std::sqrt((double)D);

  Tensor q(B, H, N, D, cs.layout, cs.dt), k(B, Hkv, N, D, cs.layout, cs.dt), v(B, Hkv, N, E, cs.layout, cs.dt);
  Tensor o(B, H, N, E, cs.layout, cs.dt), dout(B, H, N, E, cs.layout, cs.dt), dq(B, H, N, D, cs.layout, cs.dt);
  Tensor dk(B, Hkv, N, D, cs.layout, cs.dt), dv(B, Hkv, N, E, cs.layout, cs.dt);
  ASSERT_TRUE(q.dev.p && k.dev.p && v.dev.p && o.dev.p && dout.dev.p && dq.dev.p && dk.dev.p && dv.dev.p);
  q.randomize(rng, 1.0);
  k.randomize(rng, 1.0);
  v.randomize(rng, 1.0);
  dout.randomize(rng, 1.0);
  q.upload();
  k.upload();
  v.upload();
  dout.upload();
  o.poison();
  dq.poison();
  dk.poison();
  dv.poison();

  const size_t SN = (size_t)B * H * D * E;
  State sin(SN, dbl), sout(SN, dbl), gout(SN, dbl), gin(SN, dbl);
  if (cs.with_state_in) sin.randomize(rng, 1.0);
  if (cs.with_grad_out) gout.randomize(rng, 1.0);
  sout.poison();
  gin.poison();

  std::vector<double> lam(H, 0.0);
  DevBuf ddecay(H * (dbl ? 8 : 4));
  if (cs.decay) {
    std::uniform_real_distribution<double> U(0.0, 1.0);
    for (int h = 0; h < H; ++h) {
      lam[h] = std::pow(2.0, -8.0 * (h + 1) / H) * (0.5 + U(rng));  // ALiBi-like, jittered
      if (!dbl) lam[h] = (double)(float)lam[h];
    }
    if (dbl) {
      cudaMemcpy(ddecay.p, lam.data(), H * 8, cudaMemcpyHostToDevice);
    } else {
      std::vector<float> f(lam.begin(), lam.end());
      cudaMemcpy(ddecay.p, f.data(), H * 4, cudaMemcpyHostToDevice);
    }
  }

  AttnParams p;
  p.dtype = cs.dt;
  p.B = B; p.H = H; p.Hkv = Hkv; p.N = N; p.D = D; p.E = E;
  p.scale = scale;
  p.decay = cs.decay ? ddecay.p : nullptr;
  p.q = q.view(); p.k = k.view(); p.v = v.view(); p.o = o.view(); p.dout = dout.view();
  p.dq = dq.view(); p.dk = dk.view(); p.dv = dv.view();
  p.state_in = cs.with_state_in ? sin.dev.p : nullptr;
  p.state_out = cs.want_state_out ? sout.dev.p : nullptr;
  p.grad_state_out = cs.with_grad_out ? gout.dev.p : nullptr;
  p.grad_state_in = cs.want_grad_in ? gin.dev.p : nullptr;
  ASSERT_TRUE(lasp::cuda::supports(p));

  State loc(SN, dbl), locm(SN, dbl);  // split: L and M
  loc.poison();
  locm.poison();

  // ---- device ----
  {
    const size_t wb = lasp::cuda::fwd_workspace_bytes(p);
    DevBuf ws(wb);
    if (wb) {
      ASSERT_NE(ws.p, nullptr);
      CK(cudaMemset(ws.p, 0xff, wb));  // content undefined on entry: poison it
    }
    p.workspace = ws.p;
    p.workspace_bytes = wb;
    if (split) {
      AttnParams pl = p;
      pl.state_in = nullptr;
      pl.state_out = loc.dev.p;
      CK(lasp::cuda::fwd_local(pl, 0));
      p.local_ready = true;
    }
    CK(lasp::cuda::fwd(p, 0));
    CK(cudaDeviceSynchronize());
    p.local_ready = false;
  }
  {
    const size_t wb = lasp::cuda::bwd_workspace_bytes(p);
    DevBuf ws(wb);
    if (wb) {
      ASSERT_NE(ws.p, nullptr);
      CK(cudaMemset(ws.p, 0xff, wb));
    }
    p.workspace = ws.p;
    p.workspace_bytes = wb;
    if (split) {
      AttnParams pl = p;
      pl.grad_state_out = nullptr;
      pl.grad_state_in = locm.dev.p;
      CK(lasp::cuda::bwd_local(pl, 0));
      CK(lasp::cuda::bwd_prepare(p, 0));
      p.local_ready = true;
    }
    CK(lasp::cuda::bwd(p, 0));
    CK(cudaDeviceSynchronize());
    p.local_ready = false;
  }
  const std::vector<double> o_d = o.download(), dq_d = dq.download(), dk_d = dk.download(), dv_d = dv.download();

  // ---- reference (float64) ----
  std::vector<double> o_r(o.h.size()), dq_r(dq.h.size()), dk_r(dk.h.size(), 0.0), dv_r(dv.h.size(), 0.0);
  std::vector<double> sout_r(SN), gin_r(SN);
  std::vector<double> S(D * E), R(D * E);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const int kh = h / grp;
      const double g = std::exp(-lam[h]);
      for (int i = 0; i < D * E; ++i) S[i] = cs.with_state_in ? sin.h[((size_t)b * H + h) * D * E + i] : 0.0;
      for (int t = 0; t < N; ++t) {
        for (int d = 0; d < D; ++d) {
          const double kd = k.h[k.li(b, kh, t, d)];
          for (int e = 0; e < E; ++e) S[d * E + e] = g * S[d * E + e] + kd * v.h[v.li(b, kh, t, e)];
        }
        for (int e = 0; e < E; ++e) {
          double a = 0;
          for (int d = 0; d < D; ++d) a += q.h[q.li(b, h, t, d)] * S[d * E + e];
          o_r[o.li(b, h, t, e)] = scale * a;
        }
        for (int d = 0; d < D; ++d) {
          double a = 0;
          for (int e = 0; e < E; ++e) a += dout.h[dout.li(b, h, t, e)] * S[d * E + e];
          dq_r[dq.li(b, h, t, d)] = scale * a;
        }
      }
      std::copy(S.begin(), S.end(), sout_r.begin() + ((size_t)b * H + h) * D * E);
      for (int i = 0; i < D * E; ++i) R[i] = cs.with_grad_out ? gout.h[((size_t)b * H + h) * D * E + i] : 0.0;
      for (int s = N - 1; s >= 0; --s) {
        if (s < N - 1)
          for (auto& x : R) x *= g;
        for (int d = 0; d < D; ++d) {
          const double qd = scale * q.h[q.li(b, h, s, d)];
          for (int e = 0; e < E; ++e) R[d * E + e] += qd * dout.h[dout.li(b, h, s, e)];
        }
        for (int d = 0; d < D; ++d) {
          double a = 0;
          for (int e = 0; e < E; ++e) a += v.h[v.li(b, kh, s, e)] * R[d * E + e];
          dk_r[dk.li(b, kh, s, d)] += a;
        }
        for (int e = 0; e < E; ++e) {
          double a = 0;
          for (int d = 0; d < D; ++d) a += k.h[k.li(b, kh, s, d)] * R[d * E + e];
          dv_r[dv.li(b, kh, s, e)] += a;
        }
      }
      for (int i = 0; i < D * E; ++i) gin_r[((size_t)b * H + h) * D * E + i] = g * R[i];
    }
  }

  const double tol = tol_for(cs.dt);
  // States are stored in the acc type. fp32/fp64 inputs: full accuracy. bf16/fp16 inputs: the tensor-core
  // path multiplies 16-bit operands (k or q times the decay weights, rounded to 16 bits), so the states carry
  // the dtype's error, like o.
  const double tol_state = dbl ? 1e-11 : (cs.dt == ScalarType::Float32 ? 1e-5 : tol);
  if (std::getenv("LASP_TEST_VERBOSE")) {
    std::printf("%-90s o %.2e dq %.2e dk %.2e dv %.2e Sout %.2e dSin %.2e\n", cs.str().c_str(), rel_err(o_d, o_r),
                rel_err(dq_d, dq_r), rel_err(dk_d, dk_r), rel_err(dv_d, dv_r),
                cs.want_state_out ? rel_err(sout.download(), sout_r) : 0.0,
                cs.want_grad_in ? rel_err(gin.download(), gin_r) : 0.0);
  }
  EXPECT_LT(rel_err(o_d, o_r), tol) << "o";
  EXPECT_LT(rel_err(dq_d, dq_r), tol) << "dq";
  EXPECT_LT(rel_err(dk_d, dk_r), tol) << "dk";
  EXPECT_LT(rel_err(dv_d, dv_r), tol) << "dv";
  if (cs.want_state_out) EXPECT_LT(rel_err(sout.download(), sout_r), tol_state) << "state_out";
  if (cs.want_grad_in) EXPECT_LT(rel_err(gin.download(), gin_r), tol_state) << "grad_state_in";
  if (split) {  // L = S_out - gamma^N S_in and M = dS_in - gamma^N G, from the reference
    std::vector<double> l_r(SN), m_r(SN);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < D * E; ++i) {
          const size_t x = ((size_t)b * H + h) * D * E + i;
          const double gn = std::exp(-lam[h] * N);
          l_r[x] = sout_r[x] - (cs.with_state_in ? gn * sin.h[x] : 0.0);
          m_r[x] = gin_r[x] - (cs.with_grad_out ? gn * gout.h[x] : 0.0);
        }
    EXPECT_LT(rel_err(loc.download(), l_r), tol_state) << "L (fwd_local)";
    EXPECT_LT(rel_err(locm.download(), m_r), tol_state) << "M (bwd_local)";
  }
}

const ScalarType kAllTypes[] = {ScalarType::Float32, ScalarType::Float16, ScalarType::BFloat16, ScalarType::Float64};

// Shapes: (B, H, Hkv, D, E, list of N)
struct Shape {
  int B, H, Hkv, D, E;
  std::vector<int> Ns;
};

std::vector<Case> cases_for(ScalarType dt) {
  const std::vector<Shape> shapes = {
      {2, 2, 2, 64, 64, {1, 63, 64, 65, 1000}},
      {1, 4, 2, 128, 128, {1, 65, 1000}},
      {1, 4, 1, 32, 48, {63, 64, 1000}},
      {1, 2, 2, 256, 256, {64, 1000}},
      {1, 2, 1, 64, 64, {4133}},      // many segments per head
      {3, 96, 48, 32, 32, {130}},     // enough heads for one segment each
      {2, 2, 2, 17, 5, {200}},        // odd head dims
      {1, 4, 4, 128, 64, {300}},      // D != E on the tensor-core path
      {2, 4, 2, 64, 128, {129}},
      {2, 8, 8, 128, 128, {2000}},    // several segments, tensor-core path
      // several chunks in each of many segments, GQA, D = 128 (the phase-1 wgmma kernel's chunk-to-chunk
      // register hand-over: its first version failed only here)
      {1, 4, 2, 128, 128, {4133}},
  };
  // LASP_TEST_SMALL=1 (the compute-sanitizer runs): only problems of at most 9000 token-heads, which
  // still cover every path (tensor-core and generic, GQA, several segments per head, partial chunks).
  const bool small = std::getenv("LASP_TEST_SMALL") != nullptr;
  std::vector<Case> out;
  int i = (int)dt;
  for (const auto& s : shapes) {
    for (int n : s.Ns) {
      if (small && (int64_t)s.B * s.H * n > 9000) {
        ++i;
        continue;
      }
      Case c;
      c.dt = dt;
      c.B = s.B; c.H = s.H; c.Hkv = s.Hkv; c.N = n; c.D = s.D; c.E = s.E;
      c.decay = (i % 2) == 0;
      c.layout = i % 3;
      c.with_state_in = (i % 4) < 2;
      c.with_grad_out = (i % 4) != 1;
      c.want_state_out = (i % 5) != 3;
      c.want_grad_in = (i % 5) != 4;
      out.push_back(c);
      ++i;
    }
  }
  return out;
}

class CudaKernels : public ::testing::TestWithParam<ScalarType> {};

TEST_P(CudaKernels, FwdBwdMatchFloat64Reference) {
  SKIP_WITHOUT_DEVICE();
  for (const Case& c : cases_for(GetParam())) {
    run_case(c, /*split=*/false);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// The ring's order: fwd_local / bwd_local, then the main passes with the incoming state and gradient.
TEST_P(CudaKernels, LocalThenMainMatchFloat64Reference) {
  SKIP_WITHOUT_DEVICE();
  for (const Case& c : cases_for(GetParam())) {
    run_case(c, /*split=*/true);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// Head dims across 1..256 as D and as E: primes, odd dims and non-multiples of 16 / 32 / 64, whose last
// column tile (generic kernels) is partial. E = dims[(i + 11) % n] pairs each value once as D and once as
// E. Two problem sizes: one head pair cut into several segments of a few chunks, and enough heads that
// each sequence is one or two segments of many chunks. Every case runs whole and in the ring's order.
std::vector<Case> head_dim_sweep_cases(ScalarType dt) {
  const int dims[] = {1,  2,  3,   5,   7,   11,  13,  16,  17,  24,  31,  33,  40,  47,  63,  65,  72, 80,
                      96, 97, 100, 112, 127, 129, 144, 160, 176, 191, 193, 200, 224, 241, 251, 255, 256};
  const int n = (int)(sizeof(dims) / sizeof(dims[0]));
  std::vector<Case> out;
  for (int i = 0; i < n; ++i) {
    Case c;
    c.dt = dt;
    c.D = dims[i];
    c.E = dims[(i + 11) % n];
    const bool wide = i % 4 == 3;  // B * H = 40: one or two segments per head, several chunks each
    c.B = wide ? 2 : 1;
    c.H = wide ? 20 : 2;
    c.Hkv = wide ? 5 : 1;
    c.N = wide ? 230 : 200;
    c.decay = true;
    c.layout = i % 3;
    c.with_state_in = c.with_grad_out = c.want_state_out = c.want_grad_in = true;
    out.push_back(c);
  }
  for (int de : {80, 96, 160}) {  // equal dims, E a multiple of 16 / 32 but not of 64
    Case c = out.front();
    c.D = c.E = de;
    out.push_back(c);
  }
  // Multiples of 8 up to 128 in 16-bit dtypes take the mma.sync kernels padded to {64, 128}: each side of
  // the 64 boundary for D and E, both sizes, GQA.
  // Above 128 (multiples of 8): blocks of D and E on the same kernels, sums in fp32.
  const int padded[][2] = {{8, 8},    {24, 40},   {32, 32},   {32, 128},  {40, 24},   {56, 120},  {72, 16},
                           {96, 64},  {96, 96},   {104, 72},  {120, 128}, {128, 96},  {64, 32},   {128, 8},
                           {256, 256}, {192, 192}, {136, 64},  {64, 136},  {256, 40},  {24, 256},  {200, 160},
                           {160, 248}, {128, 256}, {256, 128}};
  int j = 0;
  for (const auto& de : padded) {
    Case c = out.front();
    c.D = de[0];
    c.E = de[1];
    const bool wide = j % 2 == 1;
    c.B = wide ? 2 : 1;
    c.H = wide ? 20 : 2;
    c.Hkv = wide ? 5 : 1;
    c.N = wide ? 230 : 200;
    c.layout = j % 3;
    c.decay = j % 4 != 2;
    out.push_back(c);
    ++j;
  }
  return out;
}

TEST_P(CudaKernels, HeadDimSweepMatchFloat64Reference) {
  SKIP_WITHOUT_DEVICE();
  for (const Case& c : head_dim_sweep_cases(GetParam())) {
    for (bool split : {false, true}) {
      run_case(c, split);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

// The forward main kernel the 16-bit cases take: wgmma by default where it can run, mma.sync when asked
// (FwdKernel::Mma) or elsewhere. The suites above run the default; this one runs the same cases with the
// mma.sync forward, so both kernels stay checked on sm_90.
class CudaKernelsMmaFwd : public ::testing::TestWithParam<ScalarType> {};

struct FwdKernelGuard {
  lasp::cuda::FwdKernel saved = lasp::cuda::fwd_kernel();
  explicit FwdKernelGuard(lasp::cuda::FwdKernel k) { lasp::cuda::set_fwd_kernel(k); }
  ~FwdKernelGuard() { lasp::cuda::set_fwd_kernel(saved); }
};

// A problem with 16-byte aligned (never dereferenced) contiguous views, for the planning functions.
AttnParams plan_only_params(ScalarType dt, int D, int E) {
  AttnParams p;
  p.dtype = dt;
  p.B = 1; p.H = 2; p.Hkv = 2; p.N = 1000; p.D = D; p.E = E;
  TensorView4* vs[] = {&p.q, &p.k, &p.v, &p.o, &p.dout, &p.dq, &p.dk, &p.dv};
  for (TensorView4* t : vs) {
    const int64_t X = (t == &p.v || t == &p.o || t == &p.dout || t == &p.dv) ? E : D;
    t->ptr = reinterpret_cast<void*>(uintptr_t{1} << 20);
    t->stride[0] = p.H * p.N * X; t->stride[1] = p.N * X; t->stride[2] = X; t->stride[3] = 1;
  }
  return p;
}

// Every case of cases_for(dt) the tensor-core kernels take (D and E multiples of 8; above 128 as blocks),
// whole-sequence and split.
void run_tensor_core_cases(ScalarType dt) {
  for (const Case& c : cases_for(dt)) {
    if (c.D % 8 != 0 || c.E % 8 != 0) continue;  // the generic kernels either way
    run_case(c, /*split=*/false);
    if (::testing::Test::HasFatalFailure()) return;
    run_case(c, /*split=*/true);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(CudaKernelsApi, ForwardKernelChoice) {
  SKIP_WITHOUT_DEVICE();
  FwdKernelGuard guard(lasp::cuda::FwdKernel::Wgmma);
  const char* fast = lasp::cuda::wgmma_available() ? "wgmma" : "mma";
  for (ScalarType dt : {ScalarType::BFloat16, ScalarType::Float16}) {
    EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(plan_only_params(dt, 128, 128)), fast);
    EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(plan_only_params(dt, 64, 128)), fast);
    // other multiples of 8 up to 128: mma.sync, padded (wgmma takes 64 and 128 only)
    for (int D : {8, 32, 96, 120})
      for (int E : {16, 40, 64, 128}) EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(plan_only_params(dt, D, E)), "mma");
    EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(plan_only_params(dt, 128, 96)), "mma");
    // no tensor-core kernel: not a multiple of 8
    EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(plan_only_params(dt, 33, 64)), "generic");
    EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(plan_only_params(dt, 64, 100)), "generic");
    EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(plan_only_params(dt, 201, 64)), "generic");
    // above 128: blocks of at most 128, each on its own family (wgmma where both its dims are 64 or 128)
    const char* mix = lasp::cuda::wgmma_available() ? "wgmma+mma" : "mma";
    const struct {
      int D, E;
      const char* want;
    } blocks[] = {{136, 64, mix},   {136, 96, "mma"}, {136, 256, mix},  {192, 64, fast}, {192, 96, "mma"},
                  {192, 256, fast}, {256, 64, fast},  {256, 96, "mma"}, {256, 256, fast}, {64, 192, fast},
                  {96, 256, "mma"}, {256, 40, "mma"}};
    for (const auto& c : blocks)
      EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(plan_only_params(dt, c.D, c.E)), c.want) << c.D << "x" << c.E;
  }
  EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(plan_only_params(ScalarType::Float32, 128, 128)), "generic");
  lasp::cuda::set_fwd_kernel(lasp::cuda::FwdKernel::Mma);
  EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(plan_only_params(ScalarType::BFloat16, 128, 128)), "mma");
}

struct BwdKernelGuard {
  lasp::cuda::BwdKernel saved = lasp::cuda::bwd_kernel();
  explicit BwdKernelGuard(lasp::cuda::BwdKernel k) { lasp::cuda::set_bwd_kernel(k); }
  ~BwdKernelGuard() { lasp::cuda::set_bwd_kernel(saved); }
};

// The segment split's model (plan.h, segments_for) needs no device: its choices at the shapes it was
// measured on, and its bounds.
TEST(CudaKernelsApi, SegmentSplitModel) {
  using lasp::cuda::segments_for;
  // 132 SMs of two slots (the sm_90 forward at D = 128). The gated forward fills the waves: 160 blocks of
  // 256 chunks (2 x 80 heads, E = 64) in 8 segments, 96 blocks (2 x 24 heads, two E tiles) in 8; 256 blocks
  // of 128 chunks stay unsplit.
  EXPECT_EQ(segments_for(160, 264, 256, true), 8);
  EXPECT_EQ(segments_for(96, 264, 256, true), 8);
  EXPECT_EQ(segments_for(256, 264, 128, true), 1);
  // The gated backward (one block per SM, 132 slots): 48 blocks of 256 chunks in 8 segments, 80 in 8, 160 in
  // 4; 128 blocks of 128 chunks unsplit, 16 blocks of 1024 chunks in 8.
  EXPECT_EQ(segments_for(48, 132, 256, true), 8);
  EXPECT_EQ(segments_for(80, 132, 256, true), 8);
  EXPECT_EQ(segments_for(160, 132, 256, true), 4);
  EXPECT_EQ(segments_for(128, 132, 128, true), 1);
  EXPECT_EQ(segments_for(16, 132, 1024, true), 8);
  // ... and 160 in 8 where the forward kept 8 segments' states (GVA: the forward's split), not where it
  // kept another count or none; a kept count never moves the forward's choice (kept = 0 there) or the
  // whole-waves rule
  EXPECT_EQ(segments_for(160, 132, 256, true, 8), 8);
  EXPECT_EQ(segments_for(160, 132, 256, true, 6), 4);
  EXPECT_EQ(segments_for(160, 132, 256, true, 1), 4);
  EXPECT_EQ(segments_for(128, 132, 128, true, 2), 1);
  EXPECT_EQ(segments_for(160, 264, 256, false, 8), 1);
  // the whole-waves rule: floor(slots / blocks) where the slots hold the blocks ...
  EXPECT_EQ(segments_for(160, 264, 256, false), 1);
  EXPECT_EQ(segments_for(96, 264, 256, false), 2);
  EXPECT_EQ(segments_for(32, 264, 1024, false), 8);
  EXPECT_EQ(segments_for(32, 264, 1024, true), 8);
  // ... the least waves' time where they do not (160 blocks on 132 slots: two waves of work for 1.2)
  EXPECT_EQ(segments_for(160, 132, 256, false), 4);
  EXPECT_EQ(segments_for(128, 132, 128, false), 1);
  // never more segments than chunks, never fewer than one
  for (bool fill : {false, true}) {
    for (int64_t chunks : {1, 2, 3, 7, 64})
      for (int64_t pairs : {1, 5, 64, 160, 1000}) {
        const int64_t s = segments_for(pairs, 264, chunks, fill);
        EXPECT_GE(s, 1) << pairs << " " << chunks;
        EXPECT_LE(s, chunks) << pairs << " " << chunks;
      }
    EXPECT_EQ(segments_for(0, 0, 0, fill), 1);
  }
}

// Per-token gates: wgmma takes the main passes (the backward only without an outgoing-state gradient, as
// the driver calls it with gates) and phase 1 (the local states of a split sequence); mma.sync does not.
TEST(CudaKernelsApi, GatedKernelChoice) {
  SKIP_WITHOUT_DEVICE();
  if (!lasp::cuda::wgmma_available()) GTEST_SKIP() << "wgmma is not available on this device (sm_90a only)";
  FwdKernelGuard fg(lasp::cuda::FwdKernel::Wgmma);
  BwdKernelGuard bg(lasp::cuda::BwdKernel::Wgmma);
  void* const gates = reinterpret_cast<void*>(uintptr_t{1} << 21);
  for (ScalarType dt : {ScalarType::BFloat16, ScalarType::Float16})
    for (int D : {64, 128})
      for (int E : {64, 128}) {
        AttnParams p = plan_only_params(dt, D, E);
        p.Hq = p.Hv = p.H;  // as the driver fills them (MHA)
        p.g = gates;
        p.N = 1 << 16;  // long rows of few (b, h): the plans split them into segments
        EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(p), "wgmma") << D << "x" << E;
        EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(p), "generic") << D << "x" << E;
        p.no_state_grad = true;
        EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(p), "wgmma") << D << "x" << E;
        const lasp::cuda::Plan f = lasp::cuda::plan_fwd(p), b = lasp::cuda::plan_bwd(p);
        EXPECT_GT(f.nseg, 1);
        EXPECT_GT(b.nseg, 1);
        EXPECT_EQ(f.local, lasp::cuda::Family::Wgmma) << D << "x" << E;
        EXPECT_EQ(b.local, lasp::cuda::Family::Wgmma) << D << "x" << E;
        EXPECT_EQ(b.local_fwd, lasp::cuda::Family::Wgmma) << D << "x" << E;
        p.grad_state_out = gates;
        EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(p), "generic") << D << "x" << E;
      }
  AttnParams p = plan_only_params(ScalarType::BFloat16, 96, 64);  // mma.sync's dims: generic with gates
  p.Hq = p.Hv = p.H;
  p.g = gates;
  p.no_state_grad = true;
  EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(p), "generic");
  EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(p), "generic");
  EXPECT_EQ(lasp::cuda::plan_fwd(p).local, lasp::cuda::Family::Generic);
}

// Head maps (GVA as Mamba-2's, q heads shared alone, three head counts): every role on the tensor cores,
// with and without gates on wgmma; mma.sync without gates.
TEST(CudaKernelsApi, HeadMapKernelChoice) {
  SKIP_WITHOUT_DEVICE();
  if (!lasp::cuda::wgmma_available()) GTEST_SKIP() << "wgmma is not available on this device (sm_90a only)";
  void* const gates = reinterpret_cast<void*>(uintptr_t{1} << 21);
  struct Map { int H, Hq, Hkv, Hv; };
  for (const Map m : {Map{8, 1, 1, 8}, Map{6, 2, 2, 6}, Map{4, 2, 4, 4}, Map{6, 6, 2, 3}})
    for (bool gated : {false, true}) {
      FwdKernelGuard fg(lasp::cuda::FwdKernel::Wgmma);
      BwdKernelGuard bg(lasp::cuda::BwdKernel::Wgmma);
      AttnParams p = plan_only_params(ScalarType::BFloat16, 128, 64);
      p.H = m.H; p.Hq = m.Hq; p.Hkv = m.Hkv; p.Hv = m.Hv;
      p.N = 1 << 16;
      p.no_state_grad = true;
      if (gated) p.g = gates;
      const std::string id = std::to_string(m.Hq) + "/" + std::to_string(m.Hkv) + "/" + std::to_string(m.Hv) +
                             (gated ? " gated" : "");
      EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(p), "wgmma") << id;
      EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(p), "wgmma") << id;
      const lasp::cuda::Plan f = lasp::cuda::plan_fwd(p), b = lasp::cuda::plan_bwd(p);
      EXPECT_EQ(f.local, lasp::cuda::Family::Wgmma) << id;
      EXPECT_EQ(b.local, lasp::cuda::Family::Wgmma) << id;
      EXPECT_GT(b.ws_heads, 0u) << id;  // the shared heads' gradients are summed
      // ... as fp32 sums over the shared heads themselves (reduce-adds), or, deterministic, per output head
      const size_t bn = (size_t)p.B * p.N * sizeof(float);
      const size_t f32 = (m.Hq != m.H ? lasp::cuda::align256(bn * m.Hq * p.D) : 0) +
                         (m.Hkv != m.H ? lasp::cuda::align256(bn * m.Hkv * p.D) : 0) +
                         (m.Hv != m.H ? lasp::cuda::align256(bn * m.Hv * p.E) : 0);
      EXPECT_TRUE(b.heads_f32) << id;
      EXPECT_EQ(b.ws_heads, f32) << id;
      p.deterministic = true;
      const lasp::cuda::Plan bd = lasp::cuda::plan_bwd(p);
      EXPECT_FALSE(bd.heads_f32) << id;
      EXPECT_EQ(bd.ws_heads, lasp::cuda::align256((size_t)p.B * p.H * p.N * (2 * p.D + p.E) * 2)) << id;
      p.deterministic = false;
      lasp::cuda::set_fwd_kernel(lasp::cuda::FwdKernel::Mma);
      lasp::cuda::set_bwd_kernel(lasp::cuda::BwdKernel::Mma);
      if (!gated) EXPECT_FALSE(lasp::cuda::plan_bwd(p).heads_f32) << id;  // mma.sync: per output head
      EXPECT_STREQ(lasp::cuda::fwd_main_kernel_name(p), gated ? "generic" : "mma") << id;
      EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(p), gated ? "generic" : "mma") << id;
    }
}

TEST(CudaKernelsApi, BackwardKernelChoice) {
  SKIP_WITHOUT_DEVICE();
  BwdKernelGuard guard(lasp::cuda::BwdKernel::Wgmma);
  const char* fast = lasp::cuda::wgmma_available() ? "wgmma" : "mma";
  for (ScalarType dt : {ScalarType::BFloat16, ScalarType::Float16})
    for (int D : {64, 128})
      for (int E : {64, 128}) EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(plan_only_params(dt, D, E)), fast);
  for (ScalarType dt : {ScalarType::BFloat16, ScalarType::Float16}) {
    for (int D : {8, 32, 96, 120})
      for (int E : {16, 40, 64, 128}) EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(plan_only_params(dt, D, E)), "mma");
    EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(plan_only_params(dt, 64, 100)), "generic");
    EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(plan_only_params(dt, 256, 257)), "generic");
    // above 128: blocks of at most 128, each on its own family (dq, dk, dv summed over blocks)
    const char* mix = lasp::cuda::wgmma_available() ? "wgmma+mma" : "mma";
    for (int D : {64, 192, 256}) {
      EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(plan_only_params(dt, D, 136)), mix) << D;
      EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(plan_only_params(dt, D, 256)), fast) << D;
    }
    EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(plan_only_params(dt, 256, 96)), "mma");
  }
  EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(plan_only_params(ScalarType::Float32, 128, 128)), "generic");
  lasp::cuda::set_bwd_kernel(lasp::cuda::BwdKernel::Mma);
  EXPECT_STREQ(lasp::cuda::bwd_main_kernel_name(plan_only_params(ScalarType::BFloat16, 128, 128)), "mma");
}

// The float64 checks with the mma.sync backward (BwdKernel::Mma) and the default forward, so the mma.sync
// backward stays checked on sm_90 where the default suites run the wgmma one.
class CudaKernelsMmaBwd : public ::testing::TestWithParam<ScalarType> {};

TEST_P(CudaKernelsMmaBwd, FwdBwdMatchFloat64Reference) {
  SKIP_WITHOUT_DEVICE();
  if (!lasp::cuda::wgmma_available()) GTEST_SKIP() << "the default suites already run the mma.sync backward here (no wgmma)";
  BwdKernelGuard guard(lasp::cuda::BwdKernel::Mma);
  ASSERT_STREQ(lasp::cuda::bwd_main_kernel_name(plan_only_params(GetParam(), 128, 128)), "mma");
  run_tensor_core_cases(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Dtypes16, CudaKernelsMmaBwd, ::testing::Values(ScalarType::Float16, ScalarType::BFloat16),
                         [](const ::testing::TestParamInfo<ScalarType>& i) { return std::string(dtype_name(i.param)); });

TEST_P(CudaKernelsMmaFwd, FwdBwdMatchFloat64Reference) {
  SKIP_WITHOUT_DEVICE();
  if (!lasp::cuda::wgmma_available()) GTEST_SKIP() << "the default suites already run the mma.sync forward here (no wgmma)";
  FwdKernelGuard guard(lasp::cuda::FwdKernel::Mma);
  ASSERT_STREQ(lasp::cuda::fwd_main_kernel_name(plan_only_params(GetParam(), 128, 128)), "mma");
  run_tensor_core_cases(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Dtypes16, CudaKernelsMmaFwd, ::testing::Values(ScalarType::Float16, ScalarType::BFloat16),
                         [](const ::testing::TestParamInfo<ScalarType>& i) { return std::string(dtype_name(i.param)); });

// LASP_FWD_KERNEL / LASP_BWD_KERNEL parsing (no device needed): unset, empty and "auto" give the default,
// "mma" 0, "wgmma" 1, anything else the default with a message on stderr naming the variable.
TEST(CudaKernelsApi, KernelChoiceFromEnv) {
  const char* var = "LASP_TEST_KERNEL_CHOICE";
  using lasp::cuda::fast::kernel_choice_from_env;
  unsetenv(var);
  EXPECT_EQ(kernel_choice_from_env(var, 1), 1);
  EXPECT_EQ(kernel_choice_from_env(var, 0), 0);
  setenv(var, "", 1);
  EXPECT_EQ(kernel_choice_from_env(var, 1), 1);
  setenv(var, "auto", 1);
  EXPECT_EQ(kernel_choice_from_env(var, 1), 1);
  setenv(var, "mma", 1);
  EXPECT_EQ(kernel_choice_from_env(var, 1), 0);
  setenv(var, "wgmma", 1);
  EXPECT_EQ(kernel_choice_from_env(var, 0), 1);
  setenv(var, "WGMMA!", 1);
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(kernel_choice_from_env(var, 1), 1);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find(var), std::string::npos) << err;
  EXPECT_NE(err.find("WGMMA!"), std::string::npos) << err;
  unsetenv(var);
}

// The per-device launch cache: computed once per device, the runtime's own answer, errors not kept.
TEST(CudaKernelsApi, LaunchCacheAsksOncePerDevice) {
  SKIP_WITHOUT_DEVICE();
  int dev = 0, sms = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  EXPECT_EQ(lasp::cuda::fast::device_attribute<cudaDevAttrMultiProcessorCount>(-1), sms);
  static std::atomic<int> slots[lasp::cuda::fast::kMaxDevices];
  int calls = 0;
  auto f = [&] { ++calls; return 41 + calls; };
  EXPECT_EQ(lasp::cuda::fast::memo_per_device(slots, f), 42);
  EXPECT_EQ(lasp::cuda::fast::memo_per_device(slots, f), 42);
  EXPECT_EQ(calls, 1);
  static std::atomic<int> failing[lasp::cuda::fast::kMaxDevices];
  int tries = 0;
  auto bad = [&] { ++tries; return -1; };
  EXPECT_EQ(lasp::cuda::fast::memo_per_device(failing, bad), -1);
  EXPECT_EQ(lasp::cuda::fast::memo_per_device(failing, bad), -1);
  EXPECT_EQ(tries, 2);  // a failure is asked again, never cached
}

TEST(CudaKernelsApi, SupportsRejectsWhatItCannotDo) {
  AttnParams p;
  p.dtype = ScalarType::BFloat16;
  p.B = 1; p.H = 2; p.Hkv = 2; p.N = 10; p.D = 64; p.E = 64;
  EXPECT_TRUE(lasp::cuda::supports(p));
  p.D = 257;
  EXPECT_FALSE(lasp::cuda::supports(p));
  p.D = 64;
  p.Hkv = 3;
  EXPECT_FALSE(lasp::cuda::supports(p));
  p.Hkv = 2;
  p.N = -1;
  EXPECT_FALSE(lasp::cuda::supports(p));
  p.N = 0;  // an empty piece: the state passes through
  EXPECT_TRUE(lasp::cuda::supports(p));
}

// N = 0: state_out = S_in (zeros without S_in), grad_state_in = G; nothing else is touched.
TEST(CudaKernelsApi, EmptySequencePassesTheStateThrough) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(fresh_seed());
  const int B = 2, H = 4, Hkv = 2, D = 16, E = 8;
  const size_t SN = (size_t)B * H * D * E;
  for (bool with_in : {true, false}) {
    State sin(SN, false), sout(SN, false), gout(SN, false), gin(SN, false);
    sin.randomize(rng, 1.0);
    gout.randomize(rng, 1.0);
    sout.poison();
    gin.poison();
    AttnParams p;
    p.dtype = ScalarType::BFloat16;
    p.B = B; p.H = H; p.Hkv = Hkv; p.N = 0; p.D = D; p.E = E;
    p.state_in = with_in ? sin.dev.p : nullptr;
    p.state_out = sout.dev.p;
    p.grad_state_out = with_in ? gout.dev.p : nullptr;
    p.grad_state_in = gin.dev.p;
    ASSERT_TRUE(lasp::cuda::supports(p));
    EXPECT_EQ(lasp::cuda::fwd_workspace_bytes(p), 0u);
    CK(lasp::cuda::fwd(p, 0));
    CK(lasp::cuda::bwd(p, 0));
    CK(cudaDeviceSynchronize());
    const std::vector<double> zeros(SN, 0.0);
    EXPECT_EQ(rel_err(sout.download(), with_in ? sin.h : zeros), 0.0) << "state_out";
    EXPECT_EQ(rel_err(gin.download(), with_in ? gout.h : zeros), 0.0) << "grad_state_in";
    sout.poison();
    gin.poison();
    CK(lasp::cuda::fwd_local(p, 0));  // L = M = 0 without tokens
    CK(lasp::cuda::bwd_local(p, 0));
    CK(lasp::cuda::bwd_prepare(p, 0));
    CK(cudaDeviceSynchronize());
    EXPECT_EQ(rel_err(sout.download(), zeros), 0.0) << "state_out (fwd_local)";
    EXPECT_EQ(rel_err(gin.download(), zeros), 0.0) << "grad_state_in (bwd_local)";
  }
}

INSTANTIATE_TEST_SUITE_P(AllDtypes, CudaKernels, ::testing::ValuesIn(kAllTypes),
                         [](const ::testing::TestParamInfo<ScalarType>& i) { return std::string(dtype_name(i.param)); });

}  // namespace

#else  // !LASP_WITH_CUDA

TEST(CudaKernels, Skipped) { GTEST_SKIP() << "no CUDA device: lasp was built without CUDA (LASP_WITH_CUDA unset)"; }

#endif
