"""lasp.integrations.hf on the Gated DeltaNet families (Qwen3-Next, Qwen3.5, Qwen3.5-MoE, OLMo hybrid): the
patched model equals the unpatched one.

Tiny models from configs (random weights, no downloads) mixing Gated DeltaNet and full-attention layers, with
more value heads than key heads (GVA) and a convolution kernel of 4 (a halo of 3 tokens). Checked against the
same model unpatched: logits and every parameter gradient, padding masks, the generation cache, packed
documents (against each document alone), unpatch, the errors; and sequence parallelism over 2 and 3 gloo
processes with uneven pieces (pieces of 1 and 2 tokens, shorter than the halo, so that a halo comes from
several earlier ranks), whose logits and summed gradients must equal the one-process unpatched model's.

transformers' torch path computes the delta rule in float32 whatever the model's dtype. In float64 the
reference runs transformers' own token-by-token ``torch_recurrent_gated_delta_rule`` (the definition) with
that cast made float64, so both sides are float64 there. (Its chunked ``torch_chunk_gated_delta_rule`` in
float64 is not a sharp reference: its decays are differences of cumulative sums of the log gates, and its
gradients of A_log / dt_bias are off by up to ~1e-8 relative against the recurrence, where lasp agrees to
~1e-15.)
"""
from __future__ import annotations

import copy
import datetime
import importlib
import io
import os

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="HuggingFace transformers is not installed (pip install transformers==5.17.0)"
)

import torch.distributed as dist  # noqa: E402

from conftest import count_calls as _count_calls, import_lasp, rel_err, spawn_once  # noqa: E402
from test_hf import (  # noqa: E402
    F32, F64, FULL, LIN, PG_TIMEOUT_S, TOL, _hf, assert_close, assert_same_grads, cotangent, ids_for,
    packed_positions, recompiled, run,
)

SPAWN_DEADLINE_S = 150
FAMILIES = ["qwen3_next", "qwen3_5", "qwen3_5_moe", "olmo_hybrid"]


def _hf_delta():
    import_lasp()
    return importlib.import_module("lasp.integrations.hf_delta")


def _module(family):
    return _hf_delta()._mod(family)


def tiny_config(family, layer_types=(LIN, FULL, LIN), **over):
    common = dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=len(layer_types), layer_types=list(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        max_position_embeddings=512, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4,
    )
    if family == "qwen3_next":
        from transformers import Qwen3NextConfig as C

        common.update(num_experts=2, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, mlp_only_layers=[0], experts_implementation="eager")
    elif family == "qwen3_5":
        from transformers import Qwen3_5TextConfig as C
    elif family == "qwen3_5_moe":
        from transformers import Qwen3_5MoeTextConfig as C

        common.update(num_experts=2, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, experts_implementation="eager")
    else:
        from transformers import OlmoHybridConfig as C

        common.pop("head_dim")
        common.update(linear_allow_neg_eigval=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    common.update(over)
    return C(**common)


def make_model(family, cfg, dtype, seed):
    from transformers import OlmoHybridForCausalLM, Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3NextForCausalLM

    cls = {"qwen3_next": Qwen3NextForCausalLM, "qwen3_5": Qwen3_5ForCausalLM, "qwen3_5_moe": Qwen3_5MoeForCausalLM,
           "olmo_hybrid": OlmoHybridForCausalLM}[family]
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    with torch.no_grad():  # norms away from their all-ones / all-zeros init, so that their gradients matter
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _float64_delta_rule(mod):
    """transformers' torch_recurrent_gated_delta_rule of ``mod`` (token by token) with its float32 cast made
    float64 (the same code otherwise); it takes the chunked function's arguments."""
    return recompiled(mod, "torch_recurrent_gated_delta_rule", "torch.float32", "torch.float64", 1)


@pytest.fixture
def f64_reference(monkeypatch):
    """The unpatched models compute their (chunked) delta rule with the float64 recurrence (module docstring)."""
    for fam in FAMILIES:
        mod = _module(fam)
        monkeypatch.setattr(mod, "torch_chunk_gated_delta_rule", _float64_delta_rule(mod))


@pytest.fixture
def count_calls(monkeypatch):
    """Count the integration's calls of gated_delta_attention (proves the patched path ran)."""
    return _count_calls(monkeypatch, _hf_delta(), "gated_delta_attention")


def float32_grads(model):
    """The parameters whose gradients transformers rounds to float32 in a float64 model: A_log (g is computed
    from A_log.float()) and the Qwen families' zero-centred RMSNorm weights (1 + weight.float()). Gradients summed
    over different runs (separate documents, ranks) may round apart there: they are compared at float32's
    tolerance."""
    names = set()
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if pname == "A_log" or (type(m).__name__.startswith("Qwen") and type(m).__name__.endswith("RMSNorm")):
                names.add(full)
    return names


# ----------------------------------------------------------------------------------------------
# One process


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("N", [1, 37, 70])
def test_logits_and_grads_match_unpatched(family, N, f64_reference, count_calls):
    hf = _hf()
    cfg = tiny_config(family)
    model = make_model(family, cfg, F64, seed=11 + N)
    ids = ids_for(2, N, seed=N)
    w = cotangent(2, N, cfg.vocab_size, F64, seed=N)
    want_logits, want_grads = run(model, ids, w, use_cache=False)
    assert not count_calls
    assert hf.patch(model) is model and hf.is_patched(model)
    got_logits, got_grads = run(model, ids, w, use_cache=False)
    assert len(count_calls) == cfg.layer_types.count(LIN), "the patched forward did not call gated_delta_attention"
    assert_close("logits", got_logits, want_logits, F64)
    assert_same_grads(got_grads, want_grads, F64)


@pytest.mark.parametrize("family", ["qwen3_next", "olmo_hybrid"])
def test_float32_no_worse_than_transformers(family, monkeypatch, count_calls):
    """float32: the patched model's logits and gradients are at most 2x as far from the float64 model (with the
    float64 recurrence) as the unpatched float32 model's (transformers' float32 chunked delta rule), plus a
    float32-sized floor. OLMo hybrid without RoPE (NoPE) and beta in (0, 2)."""
    hf = _hf()
    over = {"rope_parameters": None} if family == "olmo_hybrid" else {}
    cfg = tiny_config(family, (LIN, LIN, FULL), **over)
    model = make_model(family, cfg, F64, seed=5)
    ids = ids_for(2, 45, seed=3)
    w = cotangent(2, 45, cfg.vocab_size, F64, seed=3)
    with monkeypatch.context() as m:
        mod = _module(family)
        m.setattr(mod, "torch_chunk_gated_delta_rule", _float64_delta_rule(mod))
        want = run(model, ids, w, use_cache=False)
    model.to(F32)
    lowp = run(model, ids, w.to(F32), use_cache=False)
    hf.patch(model)
    got = run(model, ids, w.to(F32), use_cache=False)
    assert count_calls
    for name in ["logits"] + sorted(want[1]):
        pick = (lambda r: r[0]) if name == "logits" else (lambda r, n=name: r[1][n])
        err, lowp_err = rel_err(pick(got), pick(want)), rel_err(pick(lowp), pick(want))
        assert err <= 2 * lowp_err + 1e-5, f"{name}: error {err:.3e} vs unpatched float32 {lowp_err:.3e}"


@pytest.mark.parametrize("family", ["qwen3_5", "olmo_hybrid"])
def test_padding_mask(family, f64_reference):
    hf = _hf()
    cfg = tiny_config(family)
    model = make_model(family, cfg, F64, seed=21)
    N = 23
    ids = ids_for(2, N, seed=8)
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :6] = 0  # left padding on the second row
    w = cotangent(2, N, cfg.vocab_size, F64, seed=8) * mask[:, :, None]
    want_logits, want_grads = run(model, ids, w, attention_mask=mask, use_cache=False)
    hf.patch(model)
    got_logits, got_grads = run(model, ids, w, attention_mask=mask, use_cache=False)
    keep = mask.bool()
    assert_close("logits (unpadded positions)", got_logits[keep], want_logits[keep], F64)
    assert_same_grads(got_grads, want_grads, F64)


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5", "olmo_hybrid"])
def test_generation_cache(family, count_calls):
    """Prefill through lasp (filling the cache as transformers does), then chunked prefill and decode steps
    (transformers' own continuation): logits of every step and the cached states equal the unpatched model's;
    greedy generation gives the same tokens."""
    hf = _hf()
    cfg = tiny_config(family)
    model = make_model(family, cfg, F32, seed=31)
    ids = ids_for(2, 33, seed=9)
    chunks = [20, 10, 1, 1, 1]

    def steps():
        out, pkv, start = [], None, 0
        for c in chunks:
            r = model(ids[:, start:start + c], past_key_values=pkv, use_cache=True)
            pkv = r.past_key_values
            out.append(r.logits)
            start += c
        return out, pkv

    with torch.no_grad():
        want, want_pkv = steps()
        hf.patch(model)
        got, got_pkv = steps()
    assert len(count_calls) == cfg.layer_types.count(LIN), "the prefill did not run on lasp"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"logits of step {i} ({chunks[i]} tokens)", g, w, F32)
    for li, t in enumerate(cfg.layer_types):
        if t == LIN:
            for what in ("recurrent_states", "conv_states"):
                gs, ws = getattr(got_pkv.layers[li], what)[0], getattr(want_pkv.layers[li], what)[0]
                assert gs.dtype == ws.dtype and gs.shape == ws.shape, what
                assert_close(f"{what} of layer {li}", gs, ws, F32)
    prompt = ids[:, :12]
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    got_tokens = model.generate(prompt, **kw)
    hf.unpatch(model)
    assert torch.equal(got_tokens, model.generate(prompt, **kw))


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5", "olmo_hybrid"])
@pytest.mark.parametrize("how", ["position_ids", "position_ids_default_cache", "cu_seq_lens_q"])
def test_packed_documents_match_separate_runs(family, how, f64_reference, count_calls):
    """Documents packed into one row give the logits of each document run alone through the unpatched model,
    and the gradients of the sum of their losses: the delta rule and the convolution restart at every document
    start (documents of 1 and 2 tokens: shorter than the convolution's window). With restarting position ids
    and the config's default cache (use_cache unset, an all-ones mask) the full-attention layers keep the
    documents apart too (transformers' mask sees packed position ids only without a cache or a mask)."""
    hf = _hf()
    cfg = tiny_config(family)
    model = make_model(family, cfg, F64, seed=7)
    docs = [5, 1, 9, 2, 17]
    N = sum(docs)
    ids = ids_for(1, N, seed=8)
    w = cotangent(1, N, cfg.vocab_size, F64, seed=9)
    hf.patch(model)
    if how == "position_ids":
        kw = dict(position_ids=packed_positions(docs, 1), use_cache=False)
    elif how == "position_ids_default_cache":
        kw = dict(position_ids=packed_positions(docs, 1), attention_mask=torch.ones(1, N, dtype=torch.long))
    else:
        cu = torch.tensor([0, 5, 6, 15, 17, 34], dtype=torch.int32)
        kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=17, max_length_k=17)
    got_logits, got_grads = run(model, ids, w, **kw)
    assert len(count_calls) == cfg.layer_types.count(LIN)
    hf.unpatch(model)
    want_logits = torch.empty_like(got_logits)
    want_grads = {}
    start = 0
    for n in docs:
        logits, grads = run(model, ids[:, start:start + n], w[:, start:start + n], use_cache=False)
        want_logits[:, start:start + n] = logits
        for k, v in grads.items():
            want_grads[k] = want_grads[k] + v if k in want_grads else v
        start += n
    assert_close("logits (packed vs each document alone)", got_logits, want_logits, F64)
    assert_same_grads(got_grads, want_grads, F64, what="packed vs documents alone: ", f32_names=float32_grads(model))
    # the check can fail: transformers' own torch path lets the packed documents see each other
    leaky, _ = run(model, ids, w, position_ids=packed_positions(docs, 1), use_cache=False)
    assert rel_err(leaky, want_logits) > 100 * TOL[F64]


def test_unpatch_restores_original(count_calls):
    hf = _hf()
    cfg = tiny_config("qwen3_next")
    model = make_model("qwen3_next", cfg, F32, seed=41)
    ids = ids_for(1, 19, seed=2)
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        hf.patch(model)
        assert hf.is_patched(model)
        with pytest.raises(RuntimeError, match="already patched"):
            hf.patch(model)
        patched = model(ids, use_cache=False).logits
        hf.unpatch(model)
        n = len(count_calls)
        after = model(ids, use_cache=False).logits
    assert n == cfg.layer_types.count(LIN) and len(count_calls) == n
    assert torch.equal(before, after), "the unpatched model does not compute what it did before patching"
    assert_close("patched logits", patched, before, F32)
    for m in model.modules():
        assert "forward" not in m.__dict__ and not any(k.startswith("_lasp") for k in m.__dict__), type(m).__name__
        assert not m._forward_pre_hooks, type(m).__name__
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(model)


def test_patched_model_copies_and_pickles(count_calls):
    hf = _hf()
    model = make_model("olmo_hybrid", tiny_config("olmo_hybrid"), F32, seed=43)
    ids = ids_for(2, 21, seed=3)
    hf.patch(model)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for how, other in {"deepcopy": copy.deepcopy(model), "torch.save/load": torch.load(buf, weights_only=False)}.items():
        assert hf.is_patched(other), how
        n = len(count_calls)
        with torch.no_grad():
            got = other(ids, use_cache=False).logits
        assert len(count_calls) > n, f"{how}: the copy did not run lasp"
        assert torch.equal(got, want), f"{how}: the copy computes something else"
        hf.unpatch(other)
        assert hf.is_patched(model), how


def test_errors_name_their_argument():
    hf, d = _hf(), _hf_delta()
    with pytest.raises(ValueError, match="qwen3_next"):
        hf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no Gated DeltaNet layer"):
        d.patch_gated_deltanet(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        d.patch_gated_deltanet("model")
    cfg = tiny_config("qwen3_5")
    model = make_model("qwen3_5", cfg, F32, seed=1)
    with pytest.raises(RuntimeError, match="sp_group was given but torch.distributed is not initialized"):
        hf.patch(model, sp_group=object())
    assert not hf.is_patched(model)
    hf.patch(model)
    ids = ids_for(1, 12, seed=1)
    cu = torch.tensor([0, 5, 12])
    with pytest.raises(ValueError, match="cu_seq_lens_q .* cache"):
        model(ids, cu_seq_lens_q=cu, use_cache=True)
    with pytest.raises(ValueError, match="batch size 1"):
        model(ids_for(2, 12, seed=1), cu_seq_lens_q=cu, use_cache=False)
    with pytest.raises(ValueError, match="last offset of cu_seq_lens_q"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 5, 11]), use_cache=False)
    with pytest.raises(ValueError, match="position_ids and cu_seq_lens_q disagree"):
        model(ids, cu_seq_lens_q=cu, position_ids=torch.arange(12)[None], use_cache=False)
    hf.unpatch(model)


def test_version_checks(monkeypatch):
    hf, d = _hf(), _hf_delta()
    import transformers as tf_now

    assert tf_now.__version__ in d.SUPPORTED_TRANSFORMERS, "the test environment's transformers is not supported"
    model = make_model("qwen3_next", tiny_config("qwen3_next"), F32, seed=1)
    monkeypatch.setattr(tf_now, "__version__", "4.0.0")
    with pytest.raises(RuntimeError, match=r"supports transformers 5\.17\.0, 5\.22\.2, found 4\.0\.0"):
        hf.patch(model)
    assert not hf.is_patched(model)
    hf.patch(model, allow_untested_version=True)
    hf.unpatch(model)
    monkeypatch.undo()
    # the installed layer code is refused under the other release's number (their forwards differ)
    other = "5.22.2" if tf_now.__version__ == "5.17.0" else "5.17.0"
    monkeypatch.setattr(tf_now, "__version__", other)
    with pytest.raises(RuntimeError, match=rf"Qwen3NextGatedDeltaNet\.forward differs from the released "
                                           rf"transformers {other}"):
        hf.patch(model)
    assert not hf.is_patched(model)


def test_halo_plan():
    """Which tokens of which piece fill which rank's convolution halo (K - 1 = 3)."""
    plan = _hf_delta()._halo_plan
    lengths = [5, 1, 0, 2, 4]
    # rank 3 (tokens 6, 7) needs tokens 3, 4, 5: two from rank 0, one from rank 1; the empty rank 2 none
    assert plan(lengths, 3, 3) == ([(4, 0, 2)], [(0, 0, 2), (1, 2, 3)])
    assert plan(lengths, 0, 3) == ([(1, 2, 5), (3, 3, 5)], [])
    assert plan(lengths, 2, 3) == ([], [])
    assert plan(lengths, 4, 3) == ([], [(1, 0, 1), (3, 1, 3)])
    assert plan([2, 3], 1, 3) == ([], [(0, 1, 3)])  # only 2 tokens before: slot 0 stays zero


# ----------------------------------------------------------------------------------------------
# Sequence parallel (gloo, CPU)

# One spawn of 3 processes: the 2-way cases on the subgroup {0, 1}, the 3-way ones on WORLD. Kernel 4: a halo
# of 3 tokens; pieces of 1 and 2 tokens make a rank's halo come from several earlier ranks.
SP_WORLD = 3
SP_CASES = {
    2: [
        dict(family="qwen3_next", layer_types=(LIN, FULL, LIN), B=2, pieces=[20, 17]),
        dict(family="olmo_hybrid", layer_types=(LIN, FULL, LIN), B=1, pieces=[2, 30]),
        dict(family="qwen3_5", layer_types=(LIN, LIN), B=1, pieces=[15, 14], docs=[4, 11, 1, 9, 4]),
    ],
    3: [
        dict(family="qwen3_5", layer_types=(LIN, FULL, LIN), B=1, pieces=[13, 1, 23]),
        dict(family="qwen3_next", layer_types=(LIN, LIN, FULL), B=2, pieces=[2, 1, 30]),
        dict(family="olmo_hybrid", layer_types=(LIN, FULL, LIN), B=1, pieces=[12, 2, 20], docs=[3, 10, 1, 20]),
        dict(family="qwen3_5_moe", layer_types=(FULL, LIN), B=1, pieces=[9, 3, 12]),
    ],
}
# Gated DeltaNet layers called on their own (hidden states in, no model hook) with empty pieces: the halo
# passes over the empty rank (W = 3)
LAYER_CASES = [dict(family="qwen3_next", pieces=[2, 0, 6]), dict(family="olmo_hybrid", pieces=[9, 0, 12])]


def _layer_setup(ci):
    case = LAYER_CASES[ci]
    cfg = tiny_config(case["family"], (LIN, FULL))
    model = make_model(case["family"], cfg, F64, seed=500 + ci)
    N = sum(case["pieces"])
    g = torch.Generator().manual_seed(600 + ci)
    x = torch.randn(2, N, cfg.hidden_size, generator=g, dtype=F64)
    w = torch.randn(2, N, cfg.hidden_size, generator=g, dtype=F64)
    return case, model, model.model.layers[0].linear_attn, x, w


def run_layer(model, layer, x, w):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * w).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def _sp_setup(size, ci):
    case = SP_CASES[size][ci]
    cfg = tiny_config(case["family"], case["layer_types"])
    seed = 100 * size + ci
    N = sum(case["pieces"])
    return (case, cfg, make_model(case["family"], cfg, F64, seed), ids_for(case["B"], N, seed),
            cotangent(case["B"], N, cfg.vocab_size, F64, seed))


def _sp_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    torch.set_num_threads(1)
    hf = _hf()
    groups = {2: dist.new_group([0, 1]), 3: dist.group.WORLD}
    results = {}
    for size, group in groups.items():
        if rank >= size:
            continue
        for ci in range(len(SP_CASES[size])):
            case, cfg, model, ids, w = _sp_setup(size, ci)
            P, n = sum(case["pieces"][:rank]), case["pieces"][rank]
            hf.patch(model, sp_group=group)
            kw = {}
            if "docs" in case:
                kw["position_ids"] = packed_positions(case["docs"], case["B"])[:, P:P + n]
            try:
                results[(size, ci)] = dict(zip(("logits", "grads"), run(model, ids[:, P:P + n], w[:, P:P + n], **kw)))
            except Exception as e:  # recorded, so that the test reports it
                results[(size, ci)] = dict(error=f"{type(e).__name__}: {e}")
            if ci == 0:
                # the delta-rule layers' states passed by the scan instead of the ring
                hf.unpatch(model)
                hf.patch(model, sp_group=group, sp_strategy="scan")
                results[(size, "scan")] = run(model, ids[:, P:P + n], w[:, P:P + n], **kw)[0]
                hf.unpatch(model)
                hf.patch(model, sp_group=group)
                errs = {}
                pad = torch.ones(case["B"], n, dtype=torch.long)
                pad[:, 0] = int(rank != 0)  # padding on group rank 0 only: every rank raises
                for what, kw in (("use_cache", dict(use_cache=True)), ("padding", dict(attention_mask=pad))):
                    try:
                        model(ids[:, P:P + n], **kw)
                        errs[what] = None
                    except (RuntimeError, ValueError) as e:
                        errs[what] = str(e)
                results[(size, "errors")] = errs
            hf.unpatch(model)
    if rank < 3:
        for ci in range(len(LAYER_CASES)):
            case, model, layer, x, w = _layer_setup(ci)
            P, n = sum(case["pieces"][:rank]), case["pieces"][rank]
            hf.patch(model, sp_group=groups[3])
            results[("layer", ci)] = run_layer(model, layer, x[:, P:P + n], w[:, P:P + n])
            if ci == 0:  # the whole model with an empty piece: every rank raises (transformers' masks need a token)
                try:
                    model(ids_for(1, n, 1))
                    results["empty"] = None
                except ValueError as e:
                    results["empty"] = str(e)
            hf.unpatch(model)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _spawn():
    return spawn_once(_sp_worker, SP_WORLD, SPAWN_DEADLINE_S,
                      f"sequence-parallel Gated DeltaNet test (gloo, {SP_WORLD} processes)")


@pytest.mark.parametrize("size", [2, 3], ids=["2ranks", "3ranks"])
def test_sequence_parallel_matches_single_process(size, f64_reference):
    ranks = _spawn()[:size]
    hf = _hf()
    for ci in range(len(SP_CASES[size])):
        case, cfg, model, ids, w = _sp_setup(size, ci)
        what = f"case {ci} ({case['family']}, pieces {case['pieces']})"
        for r, res in enumerate(ranks):
            assert "error" not in res[(size, ci)], f"{what}, rank {r}: {res[(size, ci)]['error']}"
        if "docs" in case:  # packed: the model patched without a group (test_packed_documents_match_separate_runs)
            hf.patch(model)
            want_logits, want_grads = run(model, ids, w, use_cache=False,
                                          position_ids=packed_positions(case["docs"], case["B"]))
            hf.unpatch(model)
        else:
            want_logits, want_grads = run(model, ids, w, use_cache=False)  # unpatched, whole sequence
        got_logits = torch.cat([r[(size, ci)]["logits"] for r in ranks], dim=1)
        assert_close(f"{what}: logits (ranks concatenated)", got_logits, want_logits, F64)
        res = [r[(size, ci)]["grads"] for r in ranks]
        names = set().union(*res)
        got_grads = {n: sum(g[n] for g in res if n in g) for n in names}
        assert_same_grads(got_grads, want_grads, F64, what=f"{what}: summed over ranks: ",
                          f32_names=float32_grads(model))
    for r, res in enumerate(ranks):
        assert_close(f"rank {r}: logits with sp_strategy='scan'", res[(size, "scan")], res[(size, 0)]["logits"], F64)
        errs = res[(size, "errors")]
        assert errs["use_cache"] is not None and "sequence-parallel" in errs["use_cache"], f"rank {r}: {errs}"
        pad = errs["padding"]
        assert pad is not None and "padding" in pad and "group ranks [0]" in pad, f"rank {r}: {errs}"


def test_sequence_parallel_layers_with_empty_pieces(f64_reference):
    """A Gated DeltaNet layer called on its own under a group of 3 with an empty middle piece: outputs,
    input gradients and parameter gradients (summed) equal the unpatched layer's on the whole sequence. The
    whole model refuses empty pieces on every rank."""
    ranks = _spawn()
    for ci in range(len(LAYER_CASES)):
        case, model, layer, x, w = _layer_setup(ci)
        want_out, want_dx, want_grads = run_layer(model, layer, x, w)
        got_out = torch.cat([r[("layer", ci)][0] for r in ranks], dim=1)
        got_dx = torch.cat([r[("layer", ci)][1] for r in ranks], dim=1)
        assert_close(f"layer case {ci}: output", got_out, want_out, F64)
        assert_close(f"layer case {ci}: input gradient", got_dx, want_dx, F64)
        res = [r[("layer", ci)][2] for r in ranks]
        got_grads = {n: sum(g[n] for g in res if n in g) for n in set().union(*res)}
        assert_same_grads(got_grads, want_grads, F64, what=f"layer case {ci}: ", f32_names={"A_log"})
    for r, res in enumerate(ranks):
        assert res["empty"] is not None and "group ranks [1] are empty" in res["empty"], f"rank {r}: {res['empty']}"
