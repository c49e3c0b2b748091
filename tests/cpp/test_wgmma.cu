// GoogleTest of the wgmma building blocks (kernels/wgmma.cuh) on their own, against a float64 product of
// the same 16-bit inputs: the swizzled shared-memory layouts, the K-major and MN-major descriptors, the
// register A operand (RS form), the transposed A fragments by ldmatrix.trans and the accumulator layout.
// If the forward kernel built from them fails, these say which convention is off. Needs a build for
// sm_90a and a compute capability 9.0 device; skips with the reason otherwise.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "lasp_cuda.h"
#include "mma.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace {

using bf16 = __nv_bfloat16;
namespace wg = lasp::cuda::wg;
namespace mm = lasp::cuda::mma;

constexpr uint32_t kAtom = wg::kTileAtom;

// Row-major index of element 4j + r of this thread's 64 x 64 accumulator fragment.
__device__ int acc_index(int j, int r) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  return (16 * warp + g + 8 * (r >> 1)) * 64 + 8 * j + 2 * tc + (r & 1);
}

// Accumulator (64 x 64) of this thread to a row-major fp32 matrix.
__device__ void store_acc(const float (&d)[32], float* out) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) out[acc_index(j, r)] = d[4 * j + r];
}

// A: [64][128] (m x k), Bn: [64][128] (n x k), X: [64][64] (k x n), Y: [64][64] (k x m).
// out[0] = A Bn^T (K = 128, SS, both K-major), out[1] = A[:, :64] X (SS, X MN-major),
// out[2] = A[:, :64] X (RS: A fragments read from global in the mma.sync layout), out[3] = Y^T X (RS: A by
// ldmatrix.trans from swizzled Y).
__global__ void probe_kernel(const bf16* A, const bf16* Bn, const bf16* X, const bf16* Y, float* out) {
#if LASP_WGMMA
  extern __shared__ __align__(1024) unsigned char raw[];
  const uint32_t r0 = mm::smem_addr(raw), pad = (1024u - (r0 & 1023u)) & 1023u;
  const uint32_t base = r0 + pad;
  const uint32_t oA = 0, oB = 2 * kAtom, oX = 4 * kAtom, oY = 5 * kAtom;
  // wg::cp_async_tile writes the swizzled layout the kernels' TMA boxes land in (tma.cuh)
  wg::cp_async_tile<128, 128>(base + oA, A, 128, 64);
  wg::cp_async_tile<128, 128>(base + oB, Bn, 128, 64);
  wg::cp_async_tile<64, 128>(base + oX, X, 64, 64);
  wg::cp_async_tile<64, 128>(base + oY, Y, 64, 64);
  mm::cp_async_commit();
  mm::cp_async_wait<0>();
  wg::fence_async_smem();
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  float d0[32], d1[32], d2[32], d3[32];
  wg::zero_acc(d0);
  wg::zero_acc(d1);
  wg::zero_acc(d2);
  wg::zero_acc(d3);
  uint32_t ar[4][4], at[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const int m = 16 * warp + g, k = 16 * kk + 2 * tc;
    auto pair = [&](int mm_, int kk_) { return *reinterpret_cast<const uint32_t*>(A + mm_ * 128 + kk_); };
    ar[kk][0] = pair(m, k);
    ar[kk][1] = pair(m + 8, k);
    ar[kk][2] = pair(m, k + 8);
    ar[kk][3] = pair(m + 8, k + 8);
    wg::load_a_t_sw128(at[kk], base + oY, kAtom, 16 * warp, 16 * kk);
  }
  wg::fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const uint64_t da = wg::kmajor(base + oA, kk);
    const uint64_t db = wg::kmajor(base + oB, kk);
    wg::mma_ss_n64<bf16, 0, 0>(d0, da, db, 1);
  }
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t da = wg::kmajor(base + oA, kk);
    const uint64_t dx = wg::mnmajor(base + oX, kAtom, 0, kk);
    wg::mma_ss_n64<bf16, 0, 1>(d1, da, dx, 1);
    wg::mma_rs_n64<bf16, 1>(d2, ar[kk], dx, 1);
    wg::mma_rs_n64<bf16, 1>(d3, at[kk], dx, 1);
  }
  wg::commit();
  wg::wait<0>();
  wg::fence_regs(d0);
  wg::fence_regs(d1);
  wg::fence_regs(d2);
  wg::fence_regs(d3);
  store_acc(d0, out);
  store_acc(d1, out + 4096);
  store_acc(d2, out + 2 * 4096);
  store_acc(d3, out + 3 * 4096);
#else
  __trap();
#endif
}

struct Dev {
  void* p = nullptr;
  explicit Dev(size_t n) { cudaMalloc(&p, n); }
  ~Dev() { cudaFree(p); }
};

TEST(Wgmma, BuildingBlocksMatchFloat64) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    GTEST_SKIP() << "no CUDA device";
  }
  if (!lasp::cuda::wgmma_available()) GTEST_SKIP() << "wgmma needs a build for sm_90a and a compute capability 9.0 device";
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> nd;
  auto make = [&](size_t count) {
    std::vector<bf16> h(count);
    for (auto& x : h) x = __float2bfloat16(nd(rng));
    return h;
  };
  std::vector<bf16> A = make(64 * 128), Bn = make(64 * 128), X = make(64 * 64), Y = make(64 * 64);
  Dev dA(A.size() * 2), dB(Bn.size() * 2), dX(X.size() * 2), dY(Y.size() * 2), dO(4 * 4096 * 4);
  ASSERT_EQ(cudaMemcpy(dA.p, A.data(), A.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dB.p, Bn.data(), Bn.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dX.p, X.data(), X.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dY.p, Y.data(), Y.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(dO.p, 0xff, 4 * 4096 * 4), cudaSuccess);  // NaN
  const int smem = 6 * kAtom + 1024;
  ASSERT_EQ(cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), cudaSuccess);
  probe_kernel<<<1, 128, smem>>>((const bf16*)dA.p, (const bf16*)dB.p, (const bf16*)dX.p, (const bf16*)dY.p,
                                 (float*)dO.p);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got(4 * 4096);
  ASSERT_EQ(cudaMemcpy(got.data(), dO.p, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  auto f = [](bf16 x) { return (double)__bfloat162float(x); };
  std::vector<double> ref(4 * 4096, 0.0);
  for (int m = 0; m < 64; ++m)
    for (int c = 0; c < 64; ++c) {
      double s0 = 0, s1 = 0, s3 = 0;
      for (int k = 0; k < 128; ++k) s0 += f(A[m * 128 + k]) * f(Bn[c * 128 + k]);
      for (int k = 0; k < 64; ++k) s1 += f(A[m * 128 + k]) * f(X[k * 64 + c]);
      for (int k = 0; k < 64; ++k) s3 += f(Y[k * 64 + m]) * f(X[k * 64 + c]);
      ref[m * 64 + c] = s0;
      ref[4096 + m * 64 + c] = s1;
      ref[2 * 4096 + m * 64 + c] = s1;
      ref[3 * 4096 + m * 64 + c] = s3;
    }
  const char* what[4] = {"SS K-major x K-major (A B^T, K = 128)", "SS K-major x MN-major (A X)",
                         "RS registers x MN-major (A X)", "RS ldmatrix.trans x MN-major (Y^T X)"};
  for (int t = 0; t < 4; ++t) {
    double num = 0, den = 0;
    int first_bad = -1;
    for (int i = 0; i < 4096; ++i) {
      const double d = got[t * 4096 + i] - ref[t * 4096 + i];
      num += d * d;
      den += ref[t * 4096 + i] * ref[t * 4096 + i];
      if (first_bad < 0 && !(std::fabs(d) <= 1e-3 * (1 + std::fabs(ref[t * 4096 + i])))) first_bad = i;
    }
    const double rel = std::sqrt(num / den);
    EXPECT_LT(rel, 1e-5) << what[t] << ": relative error " << rel << ", first bad element (row, col) = ("
                         << first_bad / 64 << ", " << first_bad % 64 << ") got " << got[t * 4096 + std::max(first_bad, 0)]
                         << " want " << ref[t * 4096 + std::max(first_bad, 0)];
  }
}

// Gate mode 1's view of one chunk on the device (any CUDA device: no wgmma in it): warp 0 builds the
// GateTile from 64 log gates (-inf: a reset), then each of the four warps packs its 16 rows of P (64 x 64
// fp32, row-major) as the kernels do, causal and anti-causal. out: [0] the causal pack, [1] the anti-causal
// one (bf16 values, row-major), [2] w(t, s) for s <= t, [3] pre(t) (64) and the tile's fac flag.
__global__ void gate_view_kernel(const float* lam, const float* P, float scale, float* out) {
  __shared__ wg::GateTile gt;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp == 0) wg::build_tile<1>(&gt, lam[2 * lane], lam[2 * lane + 1]);
  __syncthreads();
  const auto view = wg::ChunkView<1>::at(nullptr, &gt);
  float p[32];
  for (int j = 0; j < 8; ++j)
    for (int r = 0; r < 4; ++r) p[4 * j + r] = P[acc_index(j, r)];
  for (int dir = 0; dir < 2; ++dir) {
    uint32_t pa[4][4];
    if (dir == 0) {
      view.pack<bf16, true>(p, pa, 16 * warp, scale);
    } else {
      view.pack<bf16, false>(p, pa, 16 * warp, scale);
    }
    float pm[32];  // pack_a_frags' order: pa[kk][i] holds pm[8 kk + 2 i], pm[8 kk + 2 i + 1]
    for (int kk = 0; kk < 4; ++kk)
      for (int i = 0; i < 4; ++i) {
        const float2 f = mm::unpack2<bf16>(pa[kk][i]);
        pm[8 * kk + 2 * i] = f.x;
        pm[8 * kk + 2 * i + 1] = f.y;
      }
    store_acc(pm, out + dir * 4096);
  }
  for (int i = threadIdx.x; i < 4096; i += blockDim.x)
    out[2 * 4096 + i] = i % 64 <= i / 64 ? view.w(i / 64, i % 64) : 0.f;
  if (threadIdx.x < 64) out[3 * 4096 + threadIdx.x] = view.pre(threadIdx.x);
  if (threadIdx.x == 0) out[3 * 4096 + 64] = (float)gt.fac;
}

// The view against float64: chunks of soft gates (factored), soft gates with resets (at the chunk's first
// and last token, two in a row), gates summing to just above and just below the factoring bound, strong gates
// (not factored), a chunk ending at token 40 (zeros past it, as the kernels pass them), zero gates, one
// very negative gate among soft ones. Weights and pre(t) within 2e-6 (1 + |cf[t]| + |cf[s]|) relative (the
// chunk sums' own float rounding), the packs within bf16's rounding.
TEST(Wgmma, GateViewMatchesFloat64) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    GTEST_SKIP() << "no CUDA device";
  }
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<double> nd;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const double inf = std::numeric_limits<double>::infinity();
  auto soft = [&](int) { return -std::log1p(std::exp(-(nd(rng) + 3.0))); };  // log sigmoid(x + 3)
  std::vector<std::pair<std::string, std::vector<double>>> cases;
  auto add = [&](const std::string& name, auto f) {
    std::vector<double> lam(64);
    for (int i = 0; i < 64; ++i) lam[i] = f(i);
    cases.emplace_back(name, lam);
  };
  add("soft", soft);
  add("soft with resets", [&](int i) { return (i == 0 || i == 17 || i == 18 || i == 63) ? -inf : soft(i); });
  for (double total : {-63.5, -64.5}) {
    std::vector<double> x(64);
    double sum = 0;
    for (double& v : x) sum += (v = 0.85 + 0.3 * u(rng));
    add("sum " + std::to_string(total), [&, x, sum, total](int i) { return x[i] / sum * total; });
  }
  add("strong with a reset", [&](int i) { return i == 30 ? -inf : -(5.0 + 20.0 * u(rng)); });
  add("ends at 40", [&](int i) { return i < 40 ? soft(i) : 0.0; });
  add("zero", [](int) { return 0.0; });
  add("one very negative", [&](int i) { return i == 10 ? -1000.0 : soft(i); });
  const float scale = 0.125f;
  std::vector<float> P(4096);
  for (float& x : P) x = (float)nd(rng);
  Dev dl(64 * 4), dP(4096 * 4), dO((3 * 4096 + 65) * 4);
  ASSERT_EQ(cudaMemcpy(dP.p, P.data(), 4096 * 4, cudaMemcpyHostToDevice), cudaSuccess);
  for (const auto& c : cases) {
    std::vector<float> lam(64);
    for (int i = 0; i < 64; ++i) lam[i] = (float)c.second[i];
    ASSERT_EQ(cudaMemcpy(dl.p, lam.data(), 64 * 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemset(dO.p, 0xff, (3 * 4096 + 65) * 4), cudaSuccess);  // NaN
    gate_view_kernel<<<1, 128>>>((const float*)dl.p, (const float*)dP.p, scale, (float*)dO.p);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<float> got(3 * 4096 + 65);
    ASSERT_EQ(cudaMemcpy(got.data(), dO.p, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    // float64 reference from the same float gates
    double cf[64], acc = 0;
    bool reset[64];
    for (int i = 0; i < 64; ++i) {
      reset[i] = std::isinf((double)lam[i]);
      acc += reset[i] ? 0.0 : (double)lam[i];
      cf[i] = acc;
    }
    auto cut = [&](int a, int b) {  // a reset in (a, b]
      for (int i = a + 1; i <= b; ++i)
        if (reset[i]) return true;
      return false;
    };
    auto w = [&](int t, int s) { return cut(s, t) ? 0.0 : std::exp(cf[t] - cf[s]); };
    const std::string& name = c.first;
    EXPECT_EQ(got[3 * 4096 + 64], cf[63] >= -64.0 ? 1.f : 0.f) << name << ": fac, chunk sum " << cf[63];
    auto tol = [&](int t, int s, double ref) { return 2e-6 * (1 + std::fabs(cf[t]) + std::fabs(cf[s])) * ref + 1e-30; };
    for (int t = 0; t < 64; ++t) {
      const double pre = cut(-1, t) ? 0.0 : std::exp(cf[t]);
      ASSERT_NEAR(got[3 * 4096 + t], pre, tol(t, t, pre)) << name << ": pre(" << t << ")";
      for (int s = 0; s <= t; ++s)
        ASSERT_NEAR(got[2 * 4096 + t * 64 + s], w(t, s), tol(t, s, w(t, s))) << name << ": w(" << t << ", " << s << ")";
    }
    for (int r = 0; r < 64; ++r)
      for (int col = 0; col < 64; ++col) {
        // causal: row t = r, column s = col <= t; anti-causal: row s = r, column t = col >= s
        const double causal = col <= r ? P[r * 64 + col] * (double)scale * w(r, col) : 0.0;
        const double anti = col >= r ? P[r * 64 + col] * (double)scale * w(col, r) : 0.0;
        ASSERT_NEAR(got[r * 64 + col], causal, 8e-3 * std::fabs(causal) + 1e-30)
            << name << ": causal (" << r << ", " << col << ")";
        ASSERT_NEAR(got[4096 + r * 64 + col], anti, 8e-3 * std::fabs(anti) + 1e-30)
            << name << ": anti-causal (" << r << ", " << col << ")";
      }
  }
}

// Gate mode 1's factored weights (wgmma.cuh, GateTile): wherever gate_factored admits a chunk, its factors
// exp(cf[t]) and exp(-cf[s]) are normal floats and their product, computed as the kernels do in float, is
// exp(cf[t] - cf[s]) for every s <= t; the chunks it refuses are those whose sum is below the bound. Chunks of
// random log gates whose sums sweep [-70, 0], and the extremes: the whole sum on the first or the last token.
TEST(DocStarts, GateFactorsStayNormalAndMatchTheExp) {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  int admitted = 0, refused = 0;
  for (int c = 0; c < 600; ++c) {
    const double target = -70.0 * u(rng);
    std::vector<double> lam(64);
    for (double& x : lam) x = u(rng) * u(rng);
    if (c % 5 == 1) std::fill(lam.begin(), lam.end(), 0.0), lam[0] = 1.0;
    if (c % 5 == 2) std::fill(lam.begin(), lam.end(), 0.0), lam[63] = 1.0;
    double sum = 0.0;
    for (double x : lam) sum += x;
    float cf[64];
    float acc = 0.f;
    for (int i = 0; i < 64; ++i) {
      acc += static_cast<float>(lam[i] / sum * target);
      cf[i] = acc;
    }
    if (!wg::gate_factored(cf[63])) {
      ASSERT_LT(cf[63], wg::kGateFactorMin);
      ++refused;
      continue;
    }
    ++admitted;
    for (int t = 0; t < 64; ++t) {
      const float ef = std::exp(cf[t]), en = std::exp(-cf[t]);
      ASSERT_TRUE(std::isnormal(ef) && std::isnormal(en)) << "cf=" << cf[t];
      for (int s = 0; s <= t; ++s) {
        const float w = ef * std::exp(-cf[s]);
        const double want = std::exp(static_cast<double>(cf[t]) - static_cast<double>(cf[s]));
        ASSERT_LE(w, 1.f + 4e-7f);  // at most 1, up to the rounding of the two factors
        ASSERT_NEAR(w, want, 1e-6 * want + 1e-37) << "t=" << t << " s=" << s << " cf=" << cf[t] << "," << cf[s];
      }
    }
  }
  EXPECT_GT(admitted, 400);
  EXPECT_GT(refused, 20);
}

// The bit logic of gate mode 2 (doc_starts.h), on the host against brute force over random and edge masks:
// the mask from two ballots, and the starts that cut w(t, s), pre(t) and the masked products' bounds.
TEST(DocStarts, MaskAndBoundsMatchBruteForce) {
  std::mt19937_64 rng(7);
  std::vector<unsigned long long> masks = {0ull, ~0ull, 1ull, 1ull << 63, 0x8000000000000001ull, 0x5555555555555555ull};
  for (int i = 0; i < 400; ++i) {
    unsigned long long m = rng();
    if (i % 4 == 1) m &= rng();  // sparser
    if (i % 4 == 2) m &= rng() & rng() & rng();
    masks.push_back(m);
  }
  for (unsigned long long m : masks) {
    // the two ballots of a warp whose lane l holds tokens 2l, 2l + 1
    unsigned even = 0, odd = 0;
    for (int l = 0; l < 32; ++l) {
      even |= static_cast<unsigned>((m >> (2 * l)) & 1ull) << l;
      odd |= static_cast<unsigned>((m >> (2 * l + 1)) & 1ull) << l;
    }
    ASSERT_EQ(wg::starts_mask(even, odd), m);
    auto start = [&](int i) { return ((m >> i) & 1ull) != 0; };
    for (int t = 0; t < 64; ++t) {
      int last = -1, next = 64;
      for (int i = 0; i <= t; ++i)
        if (start(i)) last = i;
      for (int i = 63; i > t; --i)
        if (start(i)) next = i;
      ASSERT_EQ(wg::last_start(m, t), last) << std::hex << m << std::dec << " t=" << t;
      ASSERT_EQ(wg::next_start(m, t), next) << std::hex << m << std::dec << " s=" << t;
      // pre(t) survives iff no start in [0, t]; w(t, s) (s <= t) iff none in (s, t], read both ways the
      // kernels read it (the causal bound from t's row, the anti-causal one from s's row)
      ASSERT_EQ(wg::last_start(m, t) < 0, last == -1);
      for (int s = 0; s <= t; ++s) {
        bool none = true;
        for (int i = s + 1; i <= t; ++i) none = none && !start(i);
        ASSERT_EQ(wg::last_start(m, t) <= s, none) << std::hex << m << std::dec << " t=" << t << " s=" << s;
        ASSERT_EQ(t < wg::next_start(m, s), none) << std::hex << m << std::dec << " t=" << t << " s=" << s;
      }
    }
  }
}

// tma::make_map keeps the maps it encoded per host thread (tma.cuh); every map it hands out must be the
// one the driver's encoder makes for that view, whether it comes from the table or not: the same view
// again, a view that differs in one field only, and more views than the table has slots (replacements).
TEST(Tma, MapTableHandsOutTheEncodersMaps) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    GTEST_SKIP() << "no CUDA device";
  }
  if (!lasp::cuda::tma::encode_fn()) GTEST_SKIP() << "the driver has no cuTensorMapEncodeTiled";
  namespace tma = lasp::cuda::tma;
  const int64_t B = 2, H = 3, N = 1000, X = 128;
  Dev buf((size_t)B * H * N * X * 2 * 4);
  ASSERT_NE(buf.p, nullptr);
  auto view = [&](int64_t offset_rows, int64_t row_stride) {
    lasp::TensorView4 t;
    t.ptr = static_cast<char*>(buf.p) + offset_rows * row_stride * 2;
    t.stride[3] = 1;
    t.stride[2] = row_stride;
    t.stride[1] = N * row_stride;
    t.stride[0] = H * N * row_stride;
    return t;
  };
  auto same = [](const CUtensorMap& a, const CUtensorMap& b) { return std::memcmp(&a, &b, sizeof a) == 0; };
  auto check = [&](const lasp::TensorView4& t, int bf, int64_t nn, int rows) {
    CUtensorMap got, want;
    std::memset(&got, 0xab, sizeof got);
    std::memset(&want, 0, sizeof want);
    ASSERT_TRUE(tma::make_map(&got, t, bf, B, H, nn, X, rows));
    ASSERT_TRUE(tma::encode_map(&want, t, bf, B, H, nn, X, rows));
    EXPECT_TRUE(same(got, want)) << "offset " << t.ptr << " rows " << rows << " N " << nn << " bf16 " << bf;
  };
  const auto a = view(0, X), b = view(8, X), c = view(0, 2 * X);
  for (int rep = 0; rep < 3; ++rep) {  // the first of each is a miss, the others hits
    check(a, true, N, 64);
    check(a, false, N, 64);  // dtype differs
    check(a, tma::kMapF32, N, 16);  // fp32 (boxes of 32 x 16)
    check(a, true, N, 16);   // box rows differ
    check(a, true, N - 1, 64);  // length differs
    check(b, true, N, 64);   // pointer differs
    check(c, true, N, 64);   // strides differ
  }
  CUtensorMap ma, mb;
  ASSERT_TRUE(tma::make_map(&ma, a, true, B, H, N, X, 64));
  ASSERT_TRUE(tma::make_map(&mb, b, true, B, H, N, X, 64));
  EXPECT_FALSE(same(ma, mb)) << "two views got the same map";
  for (int i = 0; i < 2000; ++i) check(view(8 * (i % 500), X), i % 3 != 0, N - i / 500, i % 2 ? 64 : 16);
  // a view with a non-unit last stride is refused, as the encoder path refuses it
  lasp::TensorView4 bad = a;
  bad.stride[3] = 2;
  CUtensorMap m;
  EXPECT_FALSE(tma::make_map(&m, bad, true, B, H, N, X, 64));
}

// Block b's 64 x 64 fp32 fragment, element (row, col) = (b + 1) / 4 + row + col / 2 (sums over a few blocks stay
// exact), added by reduce_acc_rows_f32 into columns 0..63 and 64..127 of rows row0 + (0..63), head 1, batch 0
// of an fp32 map; warps whose rows start at or past len add nothing.
__global__ void reduce_rows_kernel(const __grid_constant__ CUtensorMap map, int row0, int len) {
#if LASP_WGMMA
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = mm::smem_addr(smem_raw);
  const uint32_t pad = (1024u - (raw & 1023u)) & 1023u;
  unsigned char* sm = smem_raw + pad;
  const uint32_t base = raw + pad;
  float d[32];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = acc_index(j, r);
      d[4 * j + r] = 0.25f * (float)(blockIdx.x + 1) + (float)(i / 64) + 0.5f * (float)(i % 64);
    }
  const int warp = threadIdx.x >> 5;
  int cnt = 0;
  for (int nb = 0; nb < 2; ++nb)
    lasp::cuda::tma::reduce_acc_rows_f32<2>(d, &map, sm, base, 0, cnt, 16 * warp, len, 64 * nb, row0 + 16 * warp, 1, 0);
  if ((threadIdx.x & 31) == 0) lasp::cuda::tma::store_wait_all();
#endif
}

// The backward's sums over shared heads: fp32 TMA reduce-adds from the staging atoms (two atoms, each 32-column
// half through one) land on the right rows and columns of the right head, several blocks add up, rows past
// the tensor's end and warps past the chunk's end add nothing.
TEST(Tma, ReduceAddRowsSumBlocks) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    GTEST_SKIP() << "no CUDA device";
  }
  if (!lasp::cuda::wgmma_available())
    GTEST_SKIP() << "TMA stores need a build for sm_90a and a compute capability 9.0 device";
  namespace tma = lasp::cuda::tma;
  const int64_t B = 1, H = 2, N = 100, X = 128;
  const int blocks = 5, row0 = 60, len = 48;  // rows 60..107 of the block's 64: 100.. past N; warp 3 past len
  const size_t count = (size_t)B * H * N * X;
  Dev buf(count * sizeof(float));
  ASSERT_NE(buf.p, nullptr);
  ASSERT_EQ(cudaMemset(buf.p, 0, count * sizeof(float)), cudaSuccess);
  lasp::TensorView4 t;
  t.ptr = buf.p;
  t.stride[3] = 1;
  t.stride[2] = X;
  t.stride[1] = N * X;
  t.stride[0] = H * N * X;
  CUtensorMap map;
  ASSERT_TRUE(tma::make_map(&map, t, tma::kMapF32, B, H, N, X, 16));
  const int smem = 2 * (int)kAtom + 1024;
  ASSERT_EQ(cudaFuncSetAttribute(reduce_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), cudaSuccess);
  reduce_rows_kernel<<<blocks, 128, smem>>>(map, row0, len);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got(count);
  ASSERT_EQ(cudaMemcpy(got.data(), buf.p, count * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  int bad = 0;
  for (int h = 0; h < H; ++h)
    for (int nn = 0; nn < N; ++nn)
      for (int x = 0; x < X; ++x) {
        const int row = nn - row0, col = x % 64;
        double want = 0;
        if (h == 1 && row >= 0 && row < len)
          for (int b = 0; b < blocks; ++b) want += 0.25 * (b + 1) + row + 0.5 * col;
        const float v = got[((size_t)h * N + nn) * X + x];
        if (v != (float)want && bad++ < 5)
          ADD_FAILURE() << "h " << h << " n " << nn << " x " << x << ": " << v << ", want " << want;
      }
  EXPECT_EQ(bad, 0);
}

}  // namespace
