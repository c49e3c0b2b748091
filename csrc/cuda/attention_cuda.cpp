// CUDA registration of the lasp ops: the backend-independent drivers of attention.cpp (ring included)
// running the CUDA kernels of kernels/ on the current stream, on the inputs' device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/core/CachingHostAllocator.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <memory>

#include "attention.h"
#include "exchange.h"
#include "lasp_cuda.h"
#include "peer_cuda.h"
#include "value_check.h"

namespace lasp {
namespace {

using Launch = cudaError_t (*)(const AttnParams&, const cuda::CallPlan&, cudaStream_t);

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float32: return "float32";
    case ScalarType::Float16: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Float64: return "float64";
  }
  return "?";
}

void check_supported(const AttnParams& p) {
  TORCH_CHECK_VALUE(cuda::supports(p), "lasp_attention: the CUDA kernels do not support ", dtype_name(p.dtype),
                    " inputs with head dims D=", p.D, ", E=", p.E, " (supported: float32, float16, bfloat16, float64; D, E <= 256)");
}

// The call's plan (cuda::plan_call, made once) and the scratch memory it needs on the current device,
// pointed to by p.workspace and p.call_plan. The returned tensor owns both: the launches that share them
// (fwd_local + fwd, bwd_local + bwd_prepare + bwd) run while it lives.
at::Tensor alloc_workspace(AttnParams& p, bool backward) {
  auto plan = std::make_shared<cuda::CallPlan>(cuda::plan_call(p, backward));
  const size_t bytes = std::max<size_t>(plan->workspace_bytes, 1);
  at::Tensor mem = at::empty({static_cast<int64_t>(bytes)},
                             at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
  p.workspace = plan->workspace_bytes ? mem.data_ptr() : nullptr;
  p.workspace_bytes = plan->workspace_bytes;
  p.call_plan = plan.get();
  // the plan lives as long as the memory: a view whose deleter holds both
  return at::from_blob(
      mem.data_ptr(), {static_cast<int64_t>(bytes)}, [mem, plan](void*) {}, mem.options());
}

// One launch: with the plan and workspace a shared workspace brought (p.call_plan), else its own plan, made
// once here, and its scratch memory (freed at scope end: the caching allocator orders its reuse after this
// stream's work).
void launch(Launch fn, bool backward, AttnParams& p) {
  check_supported(p);
  if (p.call_plan != nullptr) {
    C10_CUDA_CHECK(fn(p, *static_cast<const cuda::CallPlan*>(p.call_plan), at::cuda::getCurrentCUDAStream()));
    return;
  }
  const at::Tensor scratch = alloc_workspace(p, backward);
  const cuda::CallPlan& plan = *static_cast<const cuda::CallPlan*>(p.call_plan);
  C10_CUDA_CHECK(fn(p, plan, at::cuda::getCurrentCUDAStream()));
  p.call_plan = nullptr;  // the plan goes with the scratch memory
  p.workspace = nullptr;
  p.workspace_bytes = 0;
}

Kernels make_cuda_kernels() {
  Kernels k{
      [](AttnParams& p) { launch(cuda::fwd, false, p); },
      [](AttnParams& p) { launch(cuda::fwd_local, false, p); },
      [](AttnParams& p) { launch(cuda::bwd, true, p); },
      [](AttnParams& p) { launch(cuda::bwd_local, true, p); },
      [](AttnParams& p) { launch(cuda::bwd_prepare, true, p); },
      [](AttnParams& p, bool backward) {
        check_supported(p);
        return alloc_workspace(p, backward);
      },
      peer_hop_cuda,
      peer_ready_cuda,
      [](const AttnParams& p, bool backward, int64_t* nseg, int64_t* seglen) {
        return backward ? cuda::bwd_split(p, nseg, seglen) : cuda::fwd_split(p, nseg, seglen);
      },
  };
  k.gates = k.head_maps = true;  // per-token gates and any head map: on the family kernels/plan.h picks (generic where none other takes them)
  return k;
}

const Kernels& cuda_kernels() {
  static const Kernels k = make_cuda_kernels();
  return k;
}

// The split registry's entry for CUDA (attention.h, forward_split): the kernels' split on `device`.
bool split_on(const at::Device& device, const AttnParams& p, bool backward, int64_t* nseg, int64_t* seglen) {
  const c10::cuda::CUDAGuard guard(device);
  return cuda_kernels().split(p, backward, nseg, seglen);
}
const bool split_registered = register_split(c10::DeviceType::CUDA, split_on);
// deferred_bad_value on CUDA (attention.h): one kernel (kernels/value_check.h) ORs its flags into a zeroed
// device word, which is copied into pinned host memory, then an event is recorded behind the copy; the
// returned function waits for that event only. The pinned block is marked in use by the stream (the host
// allocator reuses it only once the stream has passed the copy, even if the function is never called).
// Views that are not dense take a reduction and a copy instead. Inside a graph capture no host may wait:
// nothing is queued and the function returns 0 (the values are not checked there).
DeferredBad deferred_bad_value_cuda(const Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return [] { return 0.0; };
  const auto stream = at::cuda::getCurrentCUDAStream(x.device().index());
  auto done = std::make_shared<at::cuda::CUDAEvent>();
  const auto st = x.scalar_type();
  const bool kernel_dtype = st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble;
  if (kernel_dtype && x.is_non_overlapping_and_dense()) {
    const Tensor word = at::empty({1}, x.options().dtype(at::kInt));
    const Tensor flag = at::empty({1}, x.options().dtype(at::kInt).device(at::kCPU).pinned_memory(true));
    const auto dt = st == at::kHalf ? cuda::ValueDtype::F16 : st == at::kBFloat16 ? cuda::ValueDtype::BF16
                    : st == at::kFloat ? cuda::ValueDtype::F32 : cuda::ValueDtype::F64;
    C10_CUDA_CHECK(cudaMemsetAsync(word.data_ptr(), 0, sizeof(int), stream));
    C10_CUDA_CHECK(cuda::flag_bad_gates(x.const_data_ptr(), x.numel(), dt, static_cast<unsigned*>(word.data_ptr()),
                                        stream));
    C10_CUDA_CHECK(cudaMemcpyAsync(flag.data_ptr(), word.data_ptr(), sizeof(int), cudaMemcpyDeviceToHost, stream));
    at::getHostAllocator(at::kCUDA)->record_event(flag.data_ptr(), flag.storage().data_ptr().get_context(),
                                                 stream.unwrap());
    done->record(stream);
    return [flag, done] {
      done->synchronize();
      const unsigned bits = *static_cast<const volatile unsigned*>(flag.data_ptr());
      return (bits & 2u) ? std::numeric_limits<double>::quiet_NaN() : (bits & 1u) ? 1.0 : 0.0;
    };
  }
  const Tensor host = at::empty({}, x.options().device(at::kCPU).pinned_memory(true));
  host.copy_(x.max(), /*non_blocking=*/true);  // max propagates NaN
  done->record(stream);
  return [host, done] {
    done->synchronize();
    return host.item<double>();
  };
}
const bool bad_registered = register_deferred_bad_value(c10::DeviceType::CUDA, deferred_bad_value_cuda);
// The peer transport for the exchanges made without these Kernels (the gated delta rule's, exchange.h).
const bool peer_registered = register_peer_transport(c10::DeviceType::CUDA, peer_hop_cuda, peer_ready_cuda);

std::tuple<Tensor, Tensor, Tensor, Tensor> fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const std::optional<Tensor>& decay, double scale,
                                                    const std::optional<Tensor>& initial_state,
                                                    const std::optional<std::string>& group_name,
                                                    const std::string& strategy, int64_t seg_nseg,
                                                    int64_t seg_seglen, const std::optional<Tensor>& g) {
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_fwd(cuda_kernels(), q, k, v, decay, scale, initial_state, group_name, strategy, seg_nseg,
                       seg_seglen, g);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
    const std::optional<Tensor>& grad_final_state, const std::optional<Tensor>& decay, double scale,
    const Tensor& state_in, const std::optional<std::string>& group_name, const std::string& strategy,
    const std::optional<Tensor>& seg_states, int64_t seg_seglen, const std::optional<Tensor>& g) {
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_bwd(cuda_kernels(), q, k, v, dout, grad_final_state, decay, scale, state_in, group_name, strategy,
                       seg_states, seg_seglen, g);
}

}  // namespace
}  // namespace lasp

TORCH_LIBRARY_IMPL(lasp, CUDA, m) {
  m.impl("lasp_attention_fwd", &lasp::fwd_cuda);
  m.impl("lasp_attention_bwd", &lasp::bwd_cuda);
}
