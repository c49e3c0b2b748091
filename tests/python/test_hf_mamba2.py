"""lasp.integrations.hf on the Mamba-2 families (Mamba2, Bamba, NemotronH, GraniteMoeHybrid, Zamba2, FalconH1):
the patched model equals the unpatched one.

Tiny models from configs (random weights, no downloads), the mixers' weights drawn large enough that the SSD
scan's term is not lost in the D x skip term, with more heads than B / C groups (2 groups of 2 heads) and a
convolution kernel of 4 (a halo of 3 tokens); the hybrids' attention with its own particulars (GraniteMoeHybrid:
RoPE and attention_multiplier; Zamba2: one shared block in two hybrid layers with their own adapters, RoPE;
FalconH1: key and attention multipliers). Checked against the same model unpatched: logits and every parameter
gradient (float64, against transformers' own chunked scan with its float32 casts made float64; in eval and in
training mode, where the patched mixers leave transformers' fused path for their unfused one), the generation
cache, packed documents of every family against each document alone (and the packed calls refused), the
fingerprints, unpatch, copies, the errors; and sequence parallelism of every family over 2 and 3 gloo processes
with uneven pieces (pieces shorter than the halo), packed rows included, whose logits and summed gradients must
equal the one-process unpatched model's.
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

from conftest import count_calls as _count_calls, import_lasp, spawn_once  # noqa: E402
from test_hf import (  # noqa: E402
    F32, F64, PG_TIMEOUT_S, _hf, assert_close, assert_same_grads, cotangent, ids_for, recompiled,
)

FAMILIES = ["mamba2", "bamba", "nemotron_h", "granitemoehybrid", "zamba2", "falcon_h1"]
HYBRIDS = FAMILIES[1:]
V = 128


def _hf_mamba2():
    import_lasp()
    return importlib.import_module("lasp.integrations.hf_mamba2")


def tiny(family):
    """(config, causal LM class) of a tiny model: hidden 32, 4 heads of 16 in 2 groups, state 8, kernel 4, chunk 16."""
    T = transformers
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2)
    if family == "mamba2":
        return T.Mamba2Config(**common, num_heads=4, head_dim=16, state_size=8, n_groups=2, expand=2, conv_kernel=4,
                              chunk_size=16), T.Mamba2ForCausalLM
    if family == "bamba":
        return T.BambaConfig(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                             mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_expand=2,
                             mamba_d_conv=4, mamba_chunk_size=16, attn_layer_indices=[1]), T.BambaForCausalLM
    if family == "nemotron_h":
        return T.NemotronHConfig(vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
                                 ssm_state_size=8, expand=2, conv_kernel=4, chunk_size=16, hybrid_override_pattern="M*M-",
                                 head_dim=8), T.NemotronHForCausalLM
    if family == "granitemoehybrid":  # RoPE, and a softmax scale other than head_dim^-0.5
        return T.GraniteMoeHybridConfig(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                        shared_intermediate_size=64, num_local_experts=2, num_experts_per_tok=1,
                                        mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                                        mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=16,
                                        layer_types=["mamba", "attention"], experts_implementation="eager",
                                        position_embedding_type="rope", attention_multiplier=0.3), T.GraniteMoeHybridForCausalLM
    if family == "zamba2":  # one shared attention block in two hybrid layers, each with its own adapters; RoPE
        return T.Zamba2Config(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=4, intermediate_size=64, mamba_ngroups=2, mamba_d_state=8,
                              mamba_headdim=16, n_mamba_heads=4, mamba_expand=2, mamba_d_conv=4, chunk_size=16,
                              layers_block_type=["mamba", "hybrid", "hybrid"], hybrid_layer_ids=[1, 2],
                              attention_head_dim=16, num_mem_blocks=1, use_shared_attention_adapter=True,
                              adapter_rank=4, use_mem_rope=True), T.Zamba2ForCausalLM
    # attention and mamba in parallel in every layer; a key multiplier other than 1
    return T.FalconH1Config(**common, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                            mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_ssm=64, mamba_d_state=8,
                            mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=16, head_dim=8, key_multiplier=0.7,
                            attention_in_multiplier=1.3, attention_out_multiplier=0.8), T.FalconH1ForCausalLM


def make_model(family, dtype, seed):
    cfg, cls = tiny(family)
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # weights large enough that the scan's term matters (the init makes B, C tiny)
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                continue
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=F64).to(dtype))
            else:
                p.copy_((torch.randn(p.shape, generator=g, dtype=F64) * (0.5 if p.dim() > 1 else 0.1)).to(dtype))
    return cfg, model


def _float64_scan(mod):
    """transformers' mamba2_chunk_scan of ``mod`` (its torch path) with its float32 casts made float64."""
    return recompiled(mod, "mamba2_chunk_scan", ".float()", ".double()", 5)


@pytest.fixture
def f64_reference(monkeypatch):
    for fam in FAMILIES:
        mod = _hf_mamba2()._mod(fam)
        monkeypatch.setattr(mod, "mamba2_chunk_scan", _float64_scan(mod))


@pytest.fixture
def count_calls(monkeypatch):
    """Count the integration's calls of lasp_attention (proves the patched path ran)."""
    return _count_calls(monkeypatch, _hf_mamba2(), "lasp_attention")


def run(model, ids, w, **kw):
    model.zero_grad(set_to_none=True)
    logits = model(ids, **kw).logits
    (logits * w).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def f32_grads(model):
    """The parameters whose gradients transformers itself computes in float32 whatever the model's dtype, compared
    at float32's tolerance: A_log (it enters the mixers as A_log.float()), and the weights of RMSNorms that multiply
    them in float32 (NemotronHRMSNorm from transformers 5.22.2 on: ``self.weight.to(torch.float32) * ...``; their
    float32 sums over the tokens differ in order between a packed row and its documents, or across pieces)."""
    import inspect

    names = {n for n, _ in model.named_parameters() if n.endswith("A_log")}
    for mname, m in model.named_modules():
        if not isinstance(getattr(m, "weight", None), torch.nn.Parameter):
            continue
        try:
            src = inspect.getsource(type(m).forward)
        except (OSError, TypeError):
            continue
        if "self.weight.to(torch.float32)" in src:
            names.add(f"{mname}.weight")
    return names


def n_mixers(model):
    return sum(1 for m in model.modules() if type(m).__name__ in _hf().SUPPORTED_MODELS.values())


# ----------------------------------------------------------------------------------------------
# One process


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("N", [1, 37, 70])
def test_logits_and_grads_match_unpatched(family, N, f64_reference, count_calls):
    hf = _hf()
    cfg, model = make_model(family, F64, seed=11 + N)
    ids = ids_for(2, N, seed=N)
    w = cotangent(2, N, V, F64, seed=N)
    want_logits, want_grads = run(model, ids, w, use_cache=False)
    assert not count_calls
    assert hf.patch(model) is model and hf.is_patched(model)
    got_logits, got_grads = run(model, ids, w, use_cache=False)
    assert len(count_calls) == n_mixers(model), "the patched mixers did not call lasp_attention"
    assert_close("logits", got_logits, want_logits, F64)
    # A_log enters as A_log.float() in the mixers: its gradient is float32-rounded on both sides
    assert_same_grads(got_grads, want_grads, F64, f32_names=f32_grads(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_mode_matches_unpatched(family, f64_reference, count_calls):
    """Training mode: transformers takes its fused path there (mamba_ssm's kernel, or its float32 reference), the
    patched mixers their unfused path through lasp, the same function: in float64, the patched model in training
    mode gives the unpatched model's (float64) logits and gradients."""
    hf = _hf()
    cfg, model = make_model(family, F64, seed=3)
    ids = ids_for(2, 45, seed=4)
    w = cotangent(2, 45, V, F64, seed=4)
    want_logits, want_grads = run(model, ids, w, use_cache=False)  # eval: transformers' unfused path
    hf.patch(model)
    model.train()
    got_logits, got_grads = run(model, ids, w)
    assert len(count_calls) == n_mixers(model)
    assert_close("logits", got_logits, want_logits, F64)
    assert_same_grads(got_grads, want_grads, F64, f32_names=f32_grads(model))


@pytest.mark.parametrize("family", ["mamba2", "bamba"])
def test_generation_cache(family, count_calls):
    """Prefill through lasp (the cache filled as transformers fills it: its recurrent state is lasp's final state
    transposed), chunked prefill (lasp from the cached state) and one-token decode steps (transformers' own):
    the logits of every step equal the unpatched model's, and greedy generation gives the same tokens."""
    hf = _hf()
    cfg, model = make_model(family, F32, seed=31)
    ids = ids_for(2, 33, seed=9)
    chunks = [20, 10, 1, 1, 1]

    def steps():
        out, cache, start = [], None, 0
        for c in chunks:
            kw = dict(cache_params=cache) if family == "mamba2" else dict(past_key_values=cache)
            r = model(ids[:, start:start + c], use_cache=True, **kw)
            cache = r.cache_params if family == "mamba2" else r.past_key_values
            out.append(r.logits)
            start += c
        return out

    with torch.no_grad():
        want = steps()
        hf.patch(model)
        got = steps()
    assert count_calls, "the prefill did not run on lasp"
    for i, (g, w_) in enumerate(zip(got, want)):
        assert_close(f"logits of step {i} ({chunks[i]} tokens)", g, w_, F32)
    prompt = ids[:, :12]
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    got_tokens = model.generate(prompt, **kw)
    hf.unpatch(model)
    assert torch.equal(got_tokens, model.generate(prompt, **kw))


def packed_positions(docs):
    return torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)


def separate_runs(model, ids, w, docs):
    """The logits of each document of the packed row ``ids`` run alone through ``model`` (concatenated), and the
    gradients of the sum of their losses."""
    model.zero_grad(set_to_none=True)
    logits, start = [], 0
    for n in docs:
        lg = model(ids[:, start:start + n], use_cache=False).logits
        (lg * w[:, start:start + n]).sum().backward()
        logits.append(lg.detach())
        start += n
    return torch.cat(logits, 1), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def cu_kwargs(docs):
    cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(docs), max_length_k=max(docs))


PACKED_DOCS = [5, 1, 9, 2, 17]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens_q", "position_ids_defaults"])
def test_packed_documents_match_separate_runs(family, how, f64_reference, count_calls):
    """Documents packed into one row give the logits of each document alone through the unpatched model, and the
    gradients of the sum of their losses: the scan and the convolution restart at every document start (documents
    of 1 and 2 tokens, shorter than the convolution's window), and the hybrids' attention layers keep the documents
    apart (transformers' own mask from the packed position ids; GraniteMoeHybrid's built here with them), RoPE from
    the restarting positions. "position_ids_defaults": packed position ids with an all-ones attention mask and
    use_cache left to the config's default (True), which would make transformers' mask ignore the packing: the
    hook drops the mask and turns the cache off."""
    hf = _hf()
    cfg, model = make_model(family, F64, seed=7)
    docs = PACKED_DOCS
    N = sum(docs)
    ids = ids_for(1, N, seed=8)
    w = cotangent(1, N, V, F64, seed=9)
    want_logits, want_grads = separate_runs(model, ids, w, docs)
    hf.patch(model)
    if how == "position_ids":
        kw = dict(position_ids=packed_positions(docs), use_cache=False)
    elif how == "position_ids_defaults":
        assert cfg.use_cache
        kw = dict(position_ids=packed_positions(docs), attention_mask=torch.ones(1, N, dtype=torch.long))
    else:
        kw = dict(cu_kwargs(docs), use_cache=False)
    got_logits, got_grads = run(model, ids, w, **kw)
    assert count_calls
    assert_close("logits", got_logits, want_logits, F64)
    assert_same_grads(got_grads, want_grads, F64, f32_names=f32_grads(model))


@pytest.mark.parametrize("family", HYBRIDS)
def test_packed_documents_refusals(family):
    """A packed row that transformers' attention mask would not keep apart is refused, naming the argument: packed
    position ids with a cache asked for, or with a padding mask whose zeros leave a document start between two
    unpadded tokens. Restarts next to padding (left-padded rows, as generation makes them) are not refused."""
    hf = _hf()
    cfg, model = make_model(family, F32, seed=7)
    docs = PACKED_DOCS
    N = sum(docs)
    ids = ids_for(1, N, seed=8)
    pos = packed_positions(docs)
    hf.patch(model)
    with torch.no_grad():
        with pytest.raises(ValueError, match="position_ids restart .* use_cache=False"):
            model(ids, position_ids=pos, use_cache=True)
        mask = torch.ones(1, N, dtype=torch.long)
        mask[0, -1] = 0
        with pytest.raises(ValueError, match="position_ids restart at token 5 of row 0 .* attention_mask has zeros"):
            model(ids, position_ids=pos, attention_mask=mask, use_cache=False)
        with pytest.raises(ValueError, match="cu_seq_lens_q .* cannot be used with a cache"):
            model(ids, use_cache=True, **cu_kwargs(docs))
        # left padding: position ids 1, 1, 0, 1, ... (transformers' generation) restart next to the padding only
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, :2] = 0
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        model(ids_for(2, 12, seed=3), position_ids=pos, attention_mask=mask, use_cache=False)


def test_unpatch_copy_and_save(count_calls):
    hf = _hf()
    cfg, model = make_model("bamba", F32, seed=5)
    ids = ids_for(1, 20, seed=1)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        hf.patch(model)
        twin = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for m in (model, twin, loaded):
            assert_close("logits of a patched model, its copy and its reload", m(ids, use_cache=False).logits, want,
                         F32)
        n = len(count_calls)
        hf.unpatch(model)
        assert not hf.is_patched(model)
        torch.testing.assert_close(model(ids, use_cache=False).logits, want, rtol=0, atol=0)
        assert len(count_calls) == n, "unpatched mixers still call lasp"
    with pytest.raises(RuntimeError, match="already patched"):
        hf.patch(twin)


def test_errors():
    hf = _hf()
    hm = _hf_mamba2()
    with pytest.raises(ValueError, match="holds no layer lasp can swap"):
        hf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="sp_strategy"):
        hm.patch_mamba2(make_model("mamba2", F32, 1)[1], sp_strategy="fast")


@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprints_cover_what_is_reproduced(family, monkeypatch):
    """Every supported release fingerprints each function the integration replaces or reproduces (the mixer's
    forward, the three replaced functions; the hybrids' attention forward swapped under a group, the
    apply_rotary_pos_emb it calls, the base model's forward); the installed release's sources hash to its own
    fingerprints, and an attention forward that differs is refused."""
    import hashlib

    hm = _hf_mamba2()
    mod = hm._mod(family)
    objs = hm._fingerprint_objects(family, mod)
    want_keys = {f"{hm.FAMILIES[family]['mixer']}.forward", *hm._SWAPPED}
    if family != "mamba2":
        want_keys |= {f"{hm.FAMILIES[family]['attention']}.forward", f"{hm.FAMILIES[family]['model']}.forward"}
    assert want_keys <= set(objs)
    for version, fps in hm._FINGERPRINTS.items():
        assert set(objs) == set(fps[family]), (version, family)
    installed = transformers.__version__
    for key, obj in objs.items():
        got = hashlib.sha256(hm._source_of(obj).encode()).hexdigest()
        assert got == hm._FINGERPRINTS[installed][family][key], (family, key)
    if family == "mamba2":
        return
    cls = getattr(mod, hm.FAMILIES[family]["attention"])
    real = hm._source_of
    monkeypatch.setattr(hm, "_source_of", lambda obj: real(obj) + ("#" if obj is cls.forward else ""))
    model = make_model(family, F32, 1)[1]
    with pytest.raises(RuntimeError, match=rf"{cls.__name__}\.forward differs from the released transformers"):
        hm.patch_mamba2(model)
    assert not _hf().is_patched(model)


# ----------------------------------------------------------------------------------------------
# Sequence parallelism (gloo)

# (family, pieces, packing): every family, the hybrids' attention layers attending to K and V all-gathered along the
# sequence (pieces shorter than the convolution's halo of 3 included); packing None: two rows, one sequence each,
# against the unpatched model; "position_ids" / "cu_seq_lens_q": one row of PACKED_DOCS (documents crossing the
# pieces' boundaries), each rank passing its piece of the restarting position ids or the global offsets, against
# each document alone through the unpatched model
SP_CASES = {2: [("mamba2", [30, 7], None), ("mamba2", [1, 40], None), ("bamba", [20, 13], None),
                ("nemotron_h", [17, 16], None), ("granitemoehybrid", [3, 30], None), ("zamba2", [25, 8], None),
                ("falcon_h1", [10, 23], None), ("zamba2", [20, 14], "position_ids"),
                ("granitemoehybrid", [6, 28], "cu_seq_lens_q")],
            3: [("mamba2", [10, 2, 25], None), ("mamba2", [2, 1, 30], None), ("bamba", [9, 1, 20], None),
                ("nemotron_h", [2, 1, 30], None), ("granitemoehybrid", [12, 2, 19], None),
                ("zamba2", [1, 15, 17], None), ("falcon_h1", [11, 11, 11], None),
                ("falcon_h1", [5, 2, 27], "position_ids"), ("nemotron_h", [16, 2, 16], "cu_seq_lens_q")]}


def _sp_case(ci, family, pieces, packing):
    """(model, ids, cotangent, keyword arguments of the whole row) of SP case ``ci``."""
    cfg, model = make_model(family, F64, seed=40 + ci)
    N = sum(pieces)
    B = 2 if packing is None else 1
    if packing is not None:
        assert N == sum(PACKED_DOCS)
    kw = dict(use_cache=False)
    if packing == "position_ids":
        kw["position_ids"] = packed_positions(PACKED_DOCS)
    elif packing == "cu_seq_lens_q":
        kw.update(cu_kwargs(PACKED_DOCS))
    return model, ids_for(B, N, seed=ci), cotangent(B, N, V, F64, seed=ci), kw


def _sp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    import_lasp()
    from lasp.integrations import hf

    res = {}
    for ci, (family, pieces, packing) in enumerate(SP_CASES[world]):
        model, ids, w, kw = _sp_case(ci, family, pieces, packing)
        hf.patch(model, dist.group.WORLD, sp_strategy="scan" if ci == 1 else "ring")
        P, n = sum(pieces[:rank]), pieces[rank]
        if "position_ids" in kw:
            kw["position_ids"] = kw["position_ids"][:, P:P + n]
        logits, grads = run(model, ids[:, P:P + n], w[:, P:P + n], **kw)
        res[ci] = dict(logits=logits, grads=grads)
    # errors, the same on every rank
    errs = {}
    for name, call in {
        "cache": lambda: (lambda m: m(ids_for(1, 4, 0), use_cache=True))(
            hf.patch(make_model("mamba2", F32, 1)[1], dist.group.WORLD)),
        "padding": lambda: (lambda m: m(ids_for(1, 4, 0), use_cache=False,
                                        attention_mask=torch.tensor([[1, 1, 1, 0 if rank == 1 else 1]])))(
            hf.patch(make_model("zamba2", F32, 1)[1], dist.group.WORLD)),
    }.items():
        try:
            call()
            errs[name] = None
        except Exception as e:  # noqa: BLE001
            errs[name] = (type(e).__name__, str(e))
    res["errors"] = errs
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_matches_one_process(world, f64_reference):
    """Each case's logits (the ranks' pieces concatenated) and gradients (summed over the ranks) equal the
    one-process unpatched model's (packed cases: each document alone); a cache, and a padding mask on one rank of a
    hybrid, are refused on every rank alike."""
    res = spawn_once(_sp_worker, world, 200, f"Mamba-2 sequence parallel (gloo, world={world})")
    for ci, (family, pieces, packing) in enumerate(SP_CASES[world]):
        model, ids, w, kw = _sp_case(ci, family, pieces, packing)
        if packing is None:
            want_logits, want_grads = run(model, ids, w, **kw)
        else:
            want_logits, want_grads = separate_runs(model, ids, w, PACKED_DOCS)
        got = torch.cat([res[r][ci]["logits"] for r in range(world)], 1)
        what = f"case {ci} ({family}, pieces {pieces}, packing {packing}) "
        assert_close(what + "logits", got, want_logits, F64)
        assert set(res[0][ci]["grads"]) == set(want_grads), what
        summed = {k: sum(res[r][ci]["grads"][k] for r in range(world)) for k in want_grads}
        assert_same_grads(summed, want_grads, F64, what=what,
                          f32_names=f32_grads(model))
    for r in range(world):
        e = res[r]["errors"]
        assert e["cache"] is not None and "not supported under a sequence-parallel group" in e["cache"][1], e
        assert e["padding"] is not None and "padding attention masks" in e["padding"][1] \
            and "group ranks [1]" in e["padding"][1], e
