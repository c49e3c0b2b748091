// CUDA entry points of the gated delta rule's kernels: the chain of states (delta_chain.h; shared memory
// (D + C) * 32 * sizeof(T) bytes per block, up to 80 KiB at D = 256, C = 64 in float64) and the chunks'
// unit-triangular solves (delta_solve.h; (C + 128) * C * sizeof(T) bytes, 96 KiB at C = 64 in float64). Each
// enqueues on `stream` and returns the first CUDA error met.
#pragma once
#include <cuda_runtime_api.h>

#include "delta_bwd.h"
#include "delta_chain.h"
#include "delta_out.h"
#include "delta_prep.h"
#include "delta_solve.h"
#include "delta_wy16.h"

namespace lasp {
namespace cuda {

cudaError_t delta_chain(const ChainArgs<float>& args, cudaStream_t stream);
cudaError_t delta_chain(const ChainArgs<double>& args, cudaStream_t stream);
cudaError_t delta_solve(const SolveArgs<float>& args, cudaStream_t stream);

// The chain on tensor cores (delta_chain_tc.cu): tf32 products with fp32 accumulation, for float chains
// whose inputs were 16-bit (their own rounding is coarser than tf32's). A chunk matrix operand: element
// (chunk ch, row r, column c) at p[ch * sch + r * sr + c * sc], ch = bh * nc + j.
struct ChainMat {
  const float* p = nullptr;
  int64_t sch = 0, sr = 0, sc = 0;
};
// As ChainArgs<float>, with strided operands: A (C x W) and R (D x W) any strides (p null: zero), Bm (C x D)
// and Cm (D x C) with rows or columns contiguous (sr == 1 or sc == 1). p (BH, nc), S0 / Sfin (BH, D, W),
// Sstore (BH, nc, D, W) and X (BH, nc, C, W) contiguous.
struct ChainTcArgs {
  int64_t BH = 0, nc = 0;
  int C = 0, D = 0, W = 0;
  ChainMat A, Bm, Cm, R;
  const float* p = nullptr;
  const float* S0 = nullptr;
  float* Sstore = nullptr;
  float* X = nullptr;
  float* Sfin = nullptr;
  float bsign = 1, csign = 1;
  bool reverse = false;
  bool wide = false;  // 128 state columns per block (8 warps; D <= 128) instead of 32
};
// Whether delta_chain_tc takes these sizes and layouts: C and D multiples of 16, C <= 64, D <= 256 (wide: 128).
bool delta_chain_tc_takes(const ChainTcArgs& args);
// cudaErrorInvalidValue where it does not take them, cudaErrorInvalidDeviceFunction below sm_80.
cudaError_t delta_chain_tc(const ChainTcArgs& args, cudaStream_t stream);
cudaError_t delta_solve(const SolveArgs<double>& args, cudaStream_t stream);

// The chunks' fused WY quantities (delta_prep.h; prep_smem_bytes per block: 161 KiB at C = 64, D = E = 256 in
// float32). delta_prep_takes: whether the kernel takes C, D, E in elements of elem_size bytes (C <= 64, the
// shared memory within 227 KiB); delta_prep returns cudaErrorInvalidValue where it does not.
bool delta_prep_takes(int C, int D, int E, size_t elem_size);
cudaError_t delta_prep(const PrepArgs<float>& args, cudaStream_t stream);
cudaError_t delta_prep(const PrepArgs<double>& args, cudaStream_t stream);

// The WY form of the sm_90a forward in 16 bits (delta_wy16.h: one block per chunk, prep_block's shared memory).
// With minv or minv_in set, only where the mma.sync form takes the arguments (rows of k and v on 16-byte
// boundaries, D and E multiples of 16, m^-1's buffer 16-byte aligned).
bool delta_wy16_takes(const Wy16Args& args);
cudaError_t delta_wy16(const Wy16Args& args, cudaStream_t stream);

// Rows of D 16-bit entries (bf16, else fp16) of (B, H, N, D) tensors x, dy, y given by their strides of b, h, n
// (the last dim contiguous); D a power of two in 8..256, rows on 16-byte boundaries (else cudaErrorInvalidValue).
// r: one fp32 per row, at b rs[0] + h rs[1] + n rs[2].
struct L2NormRows {
  int64_t B = 0, H = 1, N = 0;
  int D = 0;
  bool bf16 = true;
  const void* x = nullptr;
  const void* dy = nullptr;
  void* y = nullptr;
  float* r = nullptr;
  int64_t xs[3] = {0, 0, 0}, dys[3] = {0, 0, 0}, ys[3] = {0, 0, 0}, rs[3] = {0, 0, 0};
};
// y = r x, r = 1 / sqrt(sum of squares over each row + 1e-6), computed in fp32 and rounded once: the l2
// normalisation of q and k (use_qk_l2norm); r written where not null (what the backward reads).
cudaError_t delta_l2norm16(const L2NormRows& args, cudaStream_t stream);
// Its gradient into y from the forward's output (in x) and r (required): dx = r (dy - x sum(dy x)) per row, in fp32,
// rounded once. (x is the forward's y rounded to 16 bits, so this differs from the gradient through the unrounded
// y by about that rounding.)
cudaError_t delta_l2norm16_bwd(const L2NormRows& args, cudaStream_t stream);

// The forward's output per chunk (delta_out.h; out_smem_bytes per block: 83 KiB at C = 64, D = 128 in
// float32). delta_out_takes as delta_prep_takes. With OutArgs::tensor_cores (float), C a multiple of 16 and
// sm_80 or later, the tensor-core form (out_tc_block) runs instead.
bool delta_out_takes(int C, int D, int E, size_t elem_size);
cudaError_t delta_out(const OutArgs<float>& args, cudaStream_t stream);
cudaError_t delta_out(const OutArgs<double>& args, cudaStream_t stream);

// The backward's gradients per chunk (delta_bwd.h; bwd_smem_bytes per block: 148 KiB at C = 64, D = E = 128
// in float32). delta_bwd_takes as delta_prep_takes. With BwdArgs::tensor_cores (float), C a multiple of 16,
// the tensor-core form's shared memory within 227 KiB (169 KiB at D = E = 128) and sm_80 or later, the
// tensor-core form (bwd_tc_block) runs instead.
bool delta_bwd_takes(int C, int D, int E, size_t elem_size);
cudaError_t delta_bwd(const BwdArgs<float>& args, cudaStream_t stream);
cudaError_t delta_bwd(const BwdArgs<double>& args, cudaStream_t stream);

// The backward's chain inputs pdo, qdo per chunk (delta_bwd.h, pro_block; pro_smem_bytes per block: 49 KiB at
// C = 64, D = 128 in float32). delta_pro_takes as delta_prep_takes.
bool delta_pro_takes(int C, int D, int E, size_t elem_size);
cudaError_t delta_pro(const ProArgs<float>& args, cudaStream_t stream);
cudaError_t delta_pro(const ProArgs<double>& args, cudaStream_t stream);

// The backward's transposed solve with m^-1 (delta_bwd.h, dr_block; dr_smem_bytes per block: 113 KiB at C = 64,
// D = E = 128 in float32). delta_dr_takes as delta_prep_takes.
bool delta_dr_takes(int C, int D, int E, size_t elem_size);
cudaError_t delta_dr(const DrArgs<float>& args, cudaStream_t stream);
cudaError_t delta_dr(const DrArgs<double>& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lasp
