"""lasp.nn.LinearAttention and lasp.models.LaspForCausalLM against pure-PyTorch float64 references.

* LinearAttention (float32) vs the same layer written out by hand around ``reference.attention_ref``
  in float64: outputs and gradients (input and every parameter); GQA/MQA, D != E, feature maps,
  decay options, norm/gate/bias on and off; states across two calls equal one call.
* chunked and fused linear cross-entropy == plain cross-entropy in float64 (values and gradients),
  under autocast no worse than the chunked one, and neither keeps full logits.
* the model: forward/backward on CPU, loss == plain cross-entropy of its logits, layer
  checkpointing changes nothing, the 1B preset's parameter count (built on the meta device).
* sequence parallelism: the model split over 2 gloo processes (spawned, free port, timeouts) gives
  the loss and the summed gradients of the unsplit model.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, NO_CUDA_REASON, REPO, gen, randn, ref, rel_err, free_port


def _lasp_modules():
    """lasp.nn / lasp.models, from this repository even when the installed lasp is another checkout."""
    import lasp

    here = os.path.join(REPO, "python", "lasp")
    try:
        import lasp.models  # noqa: F401
    except ModuleNotFoundError:
        if here not in list(lasp.__path__):
            lasp.__path__.append(here)
        import lasp.models  # noqa: F401
    import lasp.nn

    return lasp, lasp.nn, lasp.models


lasp, lnn, lmodels = _lasp_modules()


@pytest.fixture
def seed(request):
    return zlib.crc32(request.node.nodeid.encode()) % (2**31)


# ----------------------------------------------------------------------------------------------
# A float64 reference of the layer, written independently of lasp.nn


def _feature(name, x):
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "elu1":
        return torch.where(x > 0, x + 1.0, torch.exp(x))
    if name == "relu":
        return x.clamp_min(0)
    assert name is None
    return x


def reference_layer(params: dict, x, *, H, Hkv, D, E, feature_map, decay, norm, gate, scale, eps=1e-6):
    """The layer's function in float64 from a dict of float64 parameters."""
    B, N, _ = x.shape

    def lin(name, t):
        y = t @ params[name + ".weight"].T
        b = params.get(name + ".bias")
        return y if b is None else y + b

    q = _feature(feature_map, lin("q_proj", x).view(B, N, H, D))
    k = _feature(feature_map, lin("k_proj", x).view(B, N, Hkv, D))
    v = lin("v_proj", x).view(B, N, Hkv, E)
    o, _ = ref.attention_ref(q, k, v, decay, scale, layout="bnhd")  # (B, N, H, E)
    if norm:
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + eps)
        o = o.reshape(B, N, H * E) * params["o_norm.weight"]
    else:
        o = o.reshape(B, N, H * E)
    if gate:
        g = lin("g_proj", x)
        o = o * (torch.sigmoid(g) if gate in (True, "sigmoid") else g * torch.sigmoid(g))
    return lin("o_proj", o)


LAYER_CASES = [
    # H, Hkv, D, E, feature_map, decay, norm, gate, bias, scale
    (4, 4, 8, 8, "silu", "alibi", True, True, False, None),
    (4, 2, 8, 16, "elu1", None, True, "silu", True, None),
    (4, 1, 16, 8, "relu", "tensor", False, False, False, 1.0),
    (6, 3, 8, 8, None, "tensor", True, False, True, 0.5),
    (2, 2, 4, 12, "silu", "alibi", False, True, False, None),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"H{c[0]}kv{c[1]}D{c[2]}E{c[3]}-{c[4]}-{c[5]}-n{int(bool(c[6]))}g{c[7]}b{int(c[8])}")
@pytest.mark.parametrize("N", [2, 37, 130])  # N=1 with the norm: q, k get gradient only through eps
def test_linear_attention_vs_reference(case, N, seed):
    H, Hkv, D, E, fmap, decay_kind, norm, gate, bias, scale = case
    g = gen(seed)
    C = 24
    if decay_kind == "tensor":
        decay = torch.rand(H, generator=g) * 0.5
        decay[0] = 0.0
    else:
        decay = decay_kind
    torch.manual_seed(seed)
    mod = lnn.LinearAttention(C, H, Hkv, head_dim=D, value_dim=E, feature_map=fmap, decay=decay,
                              output_norm=norm, output_gate=gate, bias=bias, scale=scale)
    with torch.no_grad():  # non-trivial norm weights and biases
        for name, p in mod.named_parameters():
            if name.endswith("bias") or name == "o_norm.weight":
                p.copy_(randn(p.shape, g, scale=0.3) + (1.0 if name == "o_norm.weight" else 0.0))
    if decay_kind == "alibi":
        torch.testing.assert_close(mod.decay, lasp.alibi_slopes(H))
    elif decay_kind is None:
        assert mod.decay is None
    else:
        torch.testing.assert_close(mod.decay, decay)
    x = randn((2, N, C), g).requires_grad_(True)
    y = mod(x)
    gy = randn(y.shape, g)
    names = [n for n, _ in mod.named_parameters()]
    got = torch.autograd.grad(y, [x] + list(mod.parameters()), gy)

    p64 = {n: p.detach().double().requires_grad_(True) for n, p in mod.named_parameters()}
    x64 = x.detach().double().requires_grad_(True)
    y64 = reference_layer(p64, x64, H=H, Hkv=Hkv, D=D, E=E, feature_map=fmap, decay=mod.decay, norm=norm,
                          gate=gate, scale=scale)
    want = torch.autograd.grad(y64, [x64] + [p64[n] for n in names], gy.double())
    assert rel_err(y, y64) < 1e-4, f"output rel err {rel_err(y, y64):.2e}"
    for name, a, b in zip(["x"] + names, got, want):
        err = rel_err(a, b)
        assert err < 2e-4, f"grad of {name}: rel err {err:.2e}"


def test_linear_attention_state_and_options(seed):
    """Two calls carrying the state == one call; sp_group per call; decay stays float32 under bf16."""
    torch.manual_seed(seed)
    g = gen(seed)
    mod = lnn.LinearAttention(32, 4, 2)
    x = randn((2, 50, 32), g)
    full, s_full = mod(x, output_final_state=True)
    a, s_a = mod(x[:, :20], output_final_state=True)
    b, s_b = mod(x[:, 20:], initial_state=s_a, output_final_state=True)
    assert s_full.shape == (2, 4, 8, 8)
    assert rel_err(torch.cat([a, b], 1), full) < 1e-5
    assert rel_err(s_b, s_full) < 1e-5
    assert rel_err(mod(x, sp_group=None), full) < 1e-6
    assert "decay" in mod.state_dict()
    m16 = lnn.LinearAttention(32, 4, 2).to(torch.bfloat16)
    assert m16.decay.dtype == torch.float32 and m16.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(m16.decay, lasp.alibi_slopes(4))
    assert m16(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="num_kv_heads"):
        lnn.LinearAttention(32, 4, 3)
    with pytest.raises(ValueError, match="feature_map"):
        lnn.LinearAttention(32, 4, feature_map="tanh")
    with pytest.raises(ValueError, match="decay"):
        lnn.LinearAttention(32, 4, decay=torch.ones(3))


# ----------------------------------------------------------------------------------------------
# Chunked cross-entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy(chunk, seed):
    g = gen(seed)
    T, C, V = 64, 16, 50
    h = randn((T, C), g).requires_grad_(True)
    w = randn((V, C), g, scale=0.5).requires_grad_(True)
    y = torch.randint(0, V, (T,), generator=g)
    y[::5] = -100
    got = lmodels.chunked_cross_entropy(h, w, y, chunk_size=chunk)
    want = F.cross_entropy(h.double() @ w.double().T, y, ignore_index=-100, reduction="sum")
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    gg = torch.autograd.grad(got, [h, w])
    gw = torch.autograd.grad(want, [h, w])
    for a, b in zip(gg, gw):
        assert rel_err(a, b) < 1e-5


def test_chunked_cross_entropy_keeps_no_full_logits(seed):
    """With recomputation, no tensor as large as the full (T, V) logits is saved for backward."""
    g = gen(seed)
    T, C, V, chunk = 256, 8, 300, 32
    h = randn((T, C), g).requires_grad_(True)
    w = randn((V, C), g).requires_grad_(True)
    y = torch.randint(0, V, (T,), generator=g)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lmodels.chunked_cross_entropy(h, w, y, chunk_size=chunk)
    assert max(sizes) < chunk * V, f"a saved tensor of {max(sizes)} elements (chunk x vocab = {chunk * V})"
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(h @ w.T, y, reduction="sum")
    assert max(sizes) >= T * V  # the hook does see full logits when they are kept
    loss.backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_linear_cross_entropy(chunk, dtype, seed):
    """Loss and both gradients (computed in forward, scaled in backward) == plain cross-entropy in
    float64; an incoming gradient other than 1 scales them; either input alone may need a gradient."""
    g = gen(seed)
    T, C, V = 64, 16, 50
    h0 = randn((T, C), g).detach().to(dtype)
    w0 = (randn((V, C), g) * 0.5).detach().to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    y[::5] = -100
    y[-3:] = -100
    hd, wd = h0.double().clone().requires_grad_(True), w0.double().clone().requires_grad_(True)
    want = F.cross_entropy(hd @ wd.T, y, ignore_index=-100, reduction="sum")
    want_gh, want_gw = torch.autograd.grad(want * 0.3, [hd, wd])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    got = lmodels.fused_linear_cross_entropy(h, w, y, chunk_size=chunk)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(got.item() - want.item()) <= tol * abs(want.item())
    (got * 0.3).backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel_err(h.grad, want_gh) < tol and rel_err(w.grad, want_gw) < tol
    # only one input needs a gradient
    h1 = h0.clone().requires_grad_(True)
    (gh1,) = torch.autograd.grad(lmodels.fused_linear_cross_entropy(h1, w0, y, chunk_size=chunk) * 0.3, [h1])
    assert rel_err(gh1, want_gh) < tol
    w1 = w0.clone().requires_grad_(True)
    (gw1,) = torch.autograd.grad(lmodels.fused_linear_cross_entropy(h0, w1, y, chunk_size=chunk) * 0.3, [w1])
    assert rel_err(gw1, want_gw) < tol
    # non-contiguous hidden (a strided slice; a transposed, dense one) gives the same
    hleaf = torch.zeros(T, 2 * C, dtype=dtype)
    hleaf[:, ::2] = h0
    hleaf.requires_grad_(True)
    got_s = lmodels.fused_linear_cross_entropy(hleaf[:, ::2], w0, y, chunk_size=chunk)
    (got_s * 0.3).backward()
    assert abs(got_s.item() - want.item()) <= tol * abs(want.item())
    assert rel_err(hleaf.grad[:, ::2], want_gh) < tol and not hleaf.grad[:, 1::2].any()
    ht = h0.t().contiguous().requires_grad_(True)
    got_t = lmodels.fused_linear_cross_entropy(ht.t(), w0, y, chunk_size=chunk)
    (got_t * 0.3).backward()
    assert abs(got_t.item() - want.item()) <= tol * abs(want.item()) and rel_err(ht.grad.t(), want_gh) < tol
    # without gradients: the plain chunked loss, no graph
    with torch.no_grad():
        plain = lmodels.fused_linear_cross_entropy(h, w, y, chunk_size=chunk)
    assert not plain.requires_grad and abs(plain.item() - want.item()) <= tol * abs(want.item())


def test_fused_linear_cross_entropy_autocast(seed):
    """Under bf16 autocast with float32 weights: the gradients come back in float32 and are no further
    from the float64 loss's than the plain chunked loss's under the same autocast (bf16 matmuls)."""
    g = gen(seed)
    T, C, V = 256, 32, 300
    h0, w0 = randn((T, C), g).detach(), randn((V, C), g).detach() * 0.3
    y = torch.randint(0, V, (T,), generator=g)
    y[::9] = -100
    hd, wd = h0.double().requires_grad_(True), w0.double().requires_grad_(True)
    want = F.cross_entropy(hd @ wd.T, y, ignore_index=-100, reduction="sum")
    want_g = torch.autograd.grad(want, [hd, wd])
    errs = {}
    for name, fn in (("fused", lmodels.fused_linear_cross_entropy), ("chunked", lmodels.chunked_cross_entropy)):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, y, chunk_size=48)
        loss.backward()
        assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
        errs[name] = (abs(loss.item() - want.item()) / abs(want.item()), rel_err(h.grad, want_g[0]),
                      rel_err(w.grad, want_g[1]))
    for i in range(3):
        assert errs["fused"][i] <= 1.05 * errs["chunked"][i] + 1e-7, errs
    assert max(errs["fused"]) < 2e-2, errs  # bf16 matmuls: a few units of bf16 rounding


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("mode", ["bf16-weights", "fp32-autocast", "fp32"])
def test_fused_linear_cross_entropy_cuda(mode, seed):
    """On the GPU (fp32-accumulating bf16 GEMMs for the weight gradient): loss and gradients against the
    float64 loss, no further off than the chunked loss in the same precision; 3 chunks, one partial."""
    g = gen(seed)
    T, C, V = 2 * 1024 + 300, 256, 32000
    h0, w0 = randn((T, C), g).detach(), randn((V, C), g).detach() * 0.05
    y = torch.randint(0, V, (T,), generator=g)
    y[::11] = -100
    hd, wd = h0.double().cuda().requires_grad_(True), w0.double().cuda().requires_grad_(True)
    want = F.cross_entropy(hd @ wd.T, y.cuda(), ignore_index=-100, reduction="sum")
    want_g = torch.autograd.grad(want, [hd, wd])
    pdt = torch.bfloat16 if mode == "bf16-weights" else torch.float32
    errs = {}
    for name, fn in (("fused", lmodels.fused_linear_cross_entropy), ("chunked", lmodels.chunked_cross_entropy)):
        h = h0.to("cuda", pdt).requires_grad_(True)
        w = w0.to("cuda", pdt).requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "fp32-autocast"):
            loss = fn(h, w, y.cuda(), chunk_size=1024)
        loss.backward()
        assert h.grad.dtype == pdt and w.grad.dtype == pdt
        errs[name] = (abs(loss.item() - want.item()) / abs(want.item()), rel_err(h.grad, want_g[0]),
                      rel_err(w.grad, want_g[1]))
    for i in range(3):
        assert errs["fused"][i] <= 1.05 * errs["chunked"][i] + 1e-6, errs
    assert max(errs["fused"]) < (1e-4 if mode == "fp32" else 2e-2), errs


def test_fused_linear_cross_entropy_errors():
    h, w, y = torch.zeros(4, 3, requires_grad=True), torch.zeros(5, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="hidden .* and weight .* must share C"):
        lmodels.fused_linear_cross_entropy(h, torch.zeros(5, 2), y)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        lmodels.fused_linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        lmodels.fused_linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="labels must be int64 on cpu"):
        lmodels.fused_linear_cross_entropy(h, w, y.int())
    # no tokens: a zero that still reaches the weight
    w2 = torch.ones(5, 3, requires_grad=True)
    out = lmodels.fused_linear_cross_entropy(torch.zeros(0, 3, requires_grad=True), w2, torch.zeros(0, dtype=torch.long))
    out.backward()
    assert out.item() == 0.0 and w2.grad is not None and not w2.grad.any()


@pytest.mark.parametrize("fused_loss", [True, False])
def test_fused_loss_keeps_no_full_logits(fused_loss, seed):
    """The model's training loss never keeps (T, V) logits for backward, fused or chunked."""
    model = _tiny_model(seed, loss_chunk_size=16, fused_loss=fused_loss)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (1, 96), generator=gen(seed))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, ids).loss
    assert max(sizes) < 96 * V
    loss.backward()


# ----------------------------------------------------------------------------------------------
# The model


def _tiny_model(seed, **kw):
    torch.manual_seed(seed)
    return lmodels.LaspForCausalLM(lmodels.LaspConfig.tiny(**kw))


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True, norm="layernorm", decay="alibi", num_kv_heads=1),
                                dict(decay=None, output_gate=False, output_norm=False, mlp_act="gelu")],
                         ids=["default", "tied-ln-mqa", "plain"])
def test_model_forward_backward(kw, seed):
    model = _tiny_model(seed, loss_chunk_size=48, **kw)
    g = gen(seed)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 100), generator=g)
    labels = torch.randint(0, V, (2, 100), generator=g)
    labels[0, :3] = -100
    out = model(ids, labels, return_logits=True)
    assert out.logits.shape == (2, 100, V)
    want = F.cross_entropy(out.logits.flatten(0, 1).double(), labels.flatten(), ignore_index=-100)
    assert abs(out.loss.item() - want.item()) < 1e-5 * want.item()
    assert out.num_tokens.item() == 197
    model.zero_grad()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, gr in grads.items():
        assert gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0, n
    # layer checkpointing: same loss and gradients
    model.gradient_checkpointing = True
    model.zero_grad()
    out2 = model(ids, labels)
    out2.loss.backward()
    assert abs(out2.loss.item() - out.loss.item()) < 1e-6
    for n, p in model.named_parameters():
        assert rel_err(p.grad, grads[n]) < 1e-6, n
    # the chunked loss (recomputed in backward) instead of the fused one: same loss and gradients
    assert model.config.fused_loss
    model.config.fused_loss = False
    model.gradient_checkpointing = False
    model.zero_grad()
    out4 = model(ids, labels)
    out4.loss.backward()
    model.config.fused_loss = True
    assert abs(out4.loss.item() - out.loss.item()) < 1e-6
    for n, p in model.named_parameters():
        assert rel_err(p.grad, grads[n]) < 1e-5, n
    # a given normaliser divides the summed loss
    out3 = model(ids, labels, loss_normalizer=1.0)
    assert abs(out3.loss.item() - out.loss.item() * 197) < 1e-4 * out3.loss.item()
    assert out3.logits is None


def test_model_logits_match_manual_forward(seed):
    """The model's logits == embed -> blocks (LinearAttention as in test above) -> norm -> head by hand."""
    model = _tiny_model(seed)
    ids = torch.randint(0, 128, (1, 40), generator=gen(seed))
    x = model.embed_tokens(ids)
    for layer in model.layers:
        a = layer.attn_norm(x)
        x = x + layer.attn(a)
        m = layer.mlp_norm(x)
        x = x + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(m)) * layer.mlp.up_proj(m))
    logits = model.lm_head(model.norm(x))
    assert rel_err(model(ids, return_logits=True).logits, logits) < 1e-6
    # TransNormerLLM's per-layer decay: slopes * (1 - l/(L-1) + 1e-5)
    s = lasp.alibi_slopes(4)
    torch.testing.assert_close(model.layers[0].attn.decay, s * (1 + 1e-5))
    torch.testing.assert_close(model.layers[1].attn.decay, s * 1e-5)


def test_model_compile_matches_eager(seed):
    """LaspConfig.compile (inductor on each layer's per-token stages and the loss chunk, CPU here) gives
    the eager model's loss and gradients, with layer checkpointing, at two lengths (the second one
    recompiles with a dynamic length); every layer shares one compiled graph per stage."""
    from torch._dynamo.utils import counters

    eager = _tiny_model(seed, num_layers=3, loss_chunk_size=48)
    fused = _tiny_model(seed, num_layers=3, loss_chunk_size=48, compile=True, checkpoint_layers=True)
    fused.load_state_dict(eager.state_dict())
    assert all(layer._fused_in is not None for layer in fused.layers) and fused._ce_fn is not None
    assert fused._ce_grad_fn is not None and eager._ce_grad_fn is None
    assert all(layer._fused_in is None for layer in eager.layers) and eager._ce_fn is None
    torch._dynamo.reset()
    counters.clear()
    g = gen(seed)
    for n in (100, 61):
        ids = torch.randint(0, 128, (2, n), generator=g)
        labels = torch.randint(0, 128, (2, n), generator=g)
        labels[1, :5] = -100
        losses, grads = [], []
        for model in (eager, fused):
            model.zero_grad()
            out = model(ids, labels)
            out.loss.backward()
            losses.append(out.loss.item())
            grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        assert abs(losses[1] - losses[0]) < 1e-5 * abs(losses[0]), (n, losses)
        for k in grads[0]:
            assert rel_err(grads[1][k], grads[0][k]) < 1e-5, (n, k)
    # 3 layers x 2 lengths: attn_in, attn_out_mlp and the loss chunk compiled for the first length and
    # once more (dynamic) for the second, plus the last, shorter loss chunk of each length: not per layer
    assert counters["stats"]["unique_graphs"] <= 8, dict(counters["stats"])
    # a deep copy runs its own weights through the compiled stages (not the original's)
    import copy

    twin = copy.deepcopy(fused)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    eager.load_state_dict(twin.state_dict())
    ids = torch.randint(0, 128, (1, 61), generator=g)
    assert rel_err(twin(ids, return_logits=True).logits, eager(ids, return_logits=True).logits) < 1e-5


def test_b1_parameter_count_on_meta():
    cfg = lmodels.LaspConfig.b1()
    with torch.device("meta"):
        model = lmodels.LaspForCausalLM(cfg)
    n = model.num_parameters()
    assert 0.95e9 <= n <= 1.1e9, f"b1 has {n / 1e9:.3f}B parameters"
    assert all(p.is_meta for p in model.parameters())
    # hand count: per layer q,k,v,g,o (5 C^2) + GLU (3 C I) + 2 norms (2C) + head norm (C)
    C, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    assert n == L * (5 * C * C + 3 * C * I + 3 * C) + 2 * V * C + C
    with torch.device("meta"):
        small = lmodels.LaspForCausalLM(lmodels.LaspConfig.small())
    assert 0.1e9 < small.num_parameters() < 0.2e9


# ----------------------------------------------------------------------------------------------
# Sequence parallelism over gloo



def _sp_config(models, ckpt, gated):
    kw = dict(checkpoint_layers=ckpt, loss_chunk_size=16)
    if gated:  # Mamba-2-style per-token gates instead of the fixed decay
        kw.update(state_gate="mamba2", decay=None)
    return models.LaspConfig.tiny(**kw)


def _sp_worker(rank, world, port, seed, N, bounds, ckpt, gated, out_path):
    import torch.distributed as dist
    from datetime import timedelta

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    _, _, models = _lasp_modules()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(seed)
        model = models.LaspForCausalLM(_sp_config(models, ckpt, gated))
        g = torch.Generator().manual_seed(seed + 1)
        ids = torch.randint(0, 128, (2, N), generator=g)
        labels = torch.randint(0, 128, (2, N), generator=g)
        labels[1, 5] = -100
        lo, hi = bounds[rank], bounds[rank + 1]
        out = model(ids[:, lo:hi], labels[:, lo:hi], sp_group=dist.group.WORLD)
        out.loss.backward()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        grads = {}
        for n, p in model.named_parameters():
            dist.all_reduce(p.grad)
            grads[n] = p.grad
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Success: leave without interpreter finalization. A Gloo worker thread of torch may still drop its
    # reference to a Python-owned tensor (the gradients all-reduced above) while the interpreter shuts
    # down; it then needs the GIL, pthread_exit unwinds through a noexcept frame and the process aborts
    # ("terminate called without an active exception", exit code -6) after all its work is done.
    os._exit(0)


@pytest.mark.parametrize("ckpt,uneven,gated", [(False, False, False), (True, True, False), (False, True, True)],
                         ids=["even", "ckpt-uneven", "gated-uneven"])
def test_model_sequence_parallel_equals_unsplit(ckpt, uneven, gated, seed):
    import torch.multiprocessing as mp

    world, N = 2, 61
    bounds = [0, 25, N] if uneven else [0, 30, 60]
    if not uneven:
        N = 60
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "sp.pt")
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_sp_worker, args=(r, world, port, seed, N, bounds, ckpt, gated, out_path))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=90)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        assert not alive, "sequence-parallel workers hung (killed after 90 s)"
        assert all(p.exitcode == 0 for p in procs), f"worker exit codes {[p.exitcode for p in procs]}"
        res = torch.load(out_path)

    torch.manual_seed(seed)
    model = lmodels.LaspForCausalLM(_sp_config(lmodels, False, gated))
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 128, (2, N), generator=g)
    labels = torch.randint(0, 128, (2, N), generator=g)
    labels[1, 5] = -100
    out = model(ids, labels)
    out.loss.backward()
    assert abs(res["loss"].item() - out.loss.item()) < 1e-5 * out.loss.item(), (res["loss"].item(), out.loss.item())
    for n, p in model.named_parameters():
        err = rel_err(res["grads"][n], p.grad)
        assert err < 1e-4, f"grad of {n}: rel err {err:.2e} between sp=2 and sp=1"


# ----------------------------------------------------------------------------------------------
# Per-token state gates (LinearAttention(state_gate=...), LaspConfig.gated)


def _gated_attention_f64(q, k, v, g, decay, scale):
    """(B, N, H, *) inputs, g (B, N, H): the gated masked sum ((Q K^T) * M) V in float64 with autograd,
    M[t, s] = exp(sum_{s < i <= t} (g[i] - decay)) for s <= t (finite gates)."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    lg = g.double().transpose(1, 2)
    if decay is not None:
        lg = lg - decay.double()[None, :, None]
    cum = lg.cumsum(-1)
    N = q.shape[2]
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    M = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~mask, -float("inf")))
    o = ((q @ k.transpose(-1, -2)) * M * scale) @ v
    return o.transpose(1, 2)


@pytest.mark.parametrize("kind", ["logsigmoid", "mamba2"])
def test_linear_attention_state_gates(kind, seed):
    """The layer with state gates equals project -> the gated recurrence (float64 masked sum) -> output, and
    every parameter, the gate's included, gets the same gradient."""
    _, lnn, _ = _lasp_modules()
    torch.manual_seed(seed)
    m = lnn.LinearAttention(32, 4, 2, state_gate=kind, decay="alibi").double()
    x = torch.randn(2, 70, 32, dtype=torch.float64, generator=gen(seed))
    y = m(x)
    grads = torch.autograd.grad(y.square().sum(), list(m.parameters()))
    q, k, v = m.project(x)
    g = m.gates(x)
    assert g.shape == (2, 70, 4) and g.dtype == torch.float64 and bool((g <= 0).all())
    o = _gated_attention_f64(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), g, m.decay, m.head_dim ** -0.5)
    y_ref = m.output(o, x)
    assert rel_err(y, y_ref) < 1e-10
    want = torch.autograd.grad(y_ref.square().sum(), list(m.parameters()))
    names = [n for n, _ in m.named_parameters()]
    assert any(n in ("A_log", "dt_bias", "dt_proj.weight", "gk_proj.weight") for n in names)
    for n, a, b in zip(names, grads, want):
        assert rel_err(a, b) < 1e-8, f"grad of {n}: rel err {rel_err(a, b):.2e}"


def test_linear_attention_state_gate_errors():
    _, lnn, _ = _lasp_modules()
    with pytest.raises(ValueError, match="state_gate"):
        lnn.LinearAttention(32, 4, state_gate="sigmoid")
    with pytest.raises(ValueError, match="gate_logit_normalizer"):
        lnn.LinearAttention(32, 4, state_gate="logsigmoid", gate_logit_normalizer=0.0)
    m = lnn.LinearAttention(32, 4, state_gate="mamba2")
    m.attn_impl = lambda q, k, v, decay, scale, group: v
    with pytest.raises(ValueError, match="state gates are not supported with a custom attn_impl"):
        m(torch.randn(1, 8, 32))


def test_gated_model_forward_backward(seed):
    _, _, lmodels = _lasp_modules()
    torch.manual_seed(seed)
    cfg = lmodels.LaspConfig.gated(**{**lmodels.LaspConfig.tiny().to_dict(), "state_gate": "mamba2", "decay": None})
    assert cfg.state_gate == "mamba2" and cfg.decay is None
    model = lmodels.LaspForCausalLM(cfg)
    ids = torch.randint(0, 128, (2, 40), generator=gen(seed))
    out = model(ids, ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    gate_grads = [p.grad for n, p in model.named_parameters() if n.endswith(("A_log", "dt_bias"))]
    assert gate_grads and all(gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in gate_grads)
