"""lasp.integrations.hf: transformers' MiniMax with its linear attention on lasp equals the unpatched model.

A tiny MiniMaxForCausalLM (random weights from a config, no downloads; 2 experts, both routed so the
router weights get a real gradient and no routing can flip on rounding) mixing linear and full attention
layers, block size 16 and lengths that are not multiples of it. Checked against the same model unpatched:
logits and every parameter gradient (float32 and float64), padding masks, the generation cache (prefill,
chunked prefill, decode), unpatch, the version checks; and sequence parallelism over 2 and 3 gloo
processes (uneven contiguous pieces, full-attention layers exact, sliding window), whose logits and
gradients summed over ranks must equal the single-process unpatched model's.

In float64 the unpatched model's decay tables (query_decay, key_decay, diagonal_decay: float32 at
init, then cast) are recomputed in float64 first, so both sides are float64 throughout.
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

from conftest import count_calls, import_lasp, rel_err, spawn_once  # noqa: E402

F32, F64 = torch.float32, torch.float64
TOL = {F32: 1e-4, F64: 1e-10}
SPAWN_DEADLINE_S = 120  # a hang fails the test after this
PG_TIMEOUT_S = 60

LIN, FULL = "linear_attention", "full_attention"


def _hf():
    import_lasp()
    return importlib.import_module("lasp.integrations.hf")


def tiny_config(layer_types=(LIN, FULL, LIN, FULL), **over):
    from transformers import MiniMaxConfig

    kw = dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=len(layer_types), layer_types=list(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        num_local_experts=2, num_experts_per_tok=2, max_position_embeddings=512, block_size=16,
        experts_implementation="eager",  # the grouped_mm experts path has no float64
    )
    kw.update(over)
    return MiniMaxConfig(**kw)


def _exact_decay_tables(model):
    """Recompute the unpatched model's block decay tables in the model's dtype (they are built in
    float32 at init and cast): with float64 weights, the reference is then float64 throughout."""
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    for m in model.modules():
        if isinstance(m, MiniMaxLightningAttention):
            qd, kd, dd = m.decay_factors(m.slope_rate)
            m.query_decay.copy_(qd)
            m.key_decay.copy_(kd)
            m.diagonal_decay.copy_(dd)


def make_model(cfg, dtype, seed):
    from transformers import MiniMaxForCausalLM

    torch.manual_seed(seed)
    model = MiniMaxForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        _exact_decay_tables(model)
    return model


def ids_for(B, N, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (B, N), generator=g)


def cotangent(B, N, V, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(B, N, V, generator=g, dtype=F64).to(dtype)


def run(model, ids, w, **kw):
    """logits and {name: grad} of <logits, w>."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, **kw).logits
    (logits * w).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def recompiled(mod, name, old, new, count):
    """transformers' function ``name`` of ``mod`` (its torch path, without the hub-kernel decorator) compiled again
    with its ``count`` occurrences of ``old`` replaced by ``new``, the same code otherwise (a float64 reference)."""
    import inspect

    fn = getattr(mod, name)
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    src = inspect.getsource(fn)
    src = src[src.index("def "):]
    assert src.count(old) == count, f"transformers' {name} changed: update this test"
    ns = dict(vars(mod))
    exec(compile(src.replace(old, new), f"<{new} {mod.__name__}>", "exec"), ns)
    return ns[name]


def assert_close(name, got, want, dtype):
    err = rel_err(got, want)
    assert err <= TOL[dtype], f"{name}: relative error {err:.3e} > {TOL[dtype]:.0e}"


def assert_same_grads(got, want, dtype, what="", f32_names=()):
    """``f32_names``: parameters compared at float32's tolerance whatever ``dtype``."""
    assert set(got) == set(want), f"{what}parameters with gradients differ: {sorted(set(got) ^ set(want))}"
    for n in want:
        assert_close(f"{what}grad {n}", got[n], want[n], F32 if n in f32_names else dtype)


@pytest.fixture
def count_lasp_calls(monkeypatch):
    """Count calls of lasp_attention made by the integration (proves the patched path ran)."""
    return count_calls(monkeypatch, _hf(), "lasp_attention")


# ----------------------------------------------------------------------------------------------
# Single process


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("N", [1, 16, 37])
@pytest.mark.parametrize("use_cache", [False, None], ids=["no_cache", "default_cache"])
def test_logits_and_grads_match_unpatched(dtype, N, use_cache, count_lasp_calls):
    hf = _hf()
    cfg = tiny_config()
    model = make_model(cfg, dtype, seed=11 + N)
    ids = ids_for(2, N, seed=N)
    w = cotangent(2, N, cfg.vocab_size, dtype, seed=N)
    want_logits, want_grads = run(model, ids, w, use_cache=use_cache)
    assert not count_lasp_calls

    hf.patch_minimax(model)
    got_logits, got_grads = run(model, ids, w, use_cache=use_cache)
    assert len(count_lasp_calls) == cfg.layer_types.count(LIN), "the patched forward did not call lasp_attention"
    assert_close("logits", got_logits, want_logits, dtype)
    assert_same_grads(got_grads, want_grads, dtype)


def test_bfloat16_no_worse_than_unpatched(count_lasp_calls):
    """bf16: the patched model's logits are at most 2x as far from the float64 model as the unpatched
    bf16 model's (plus a small floor), the flash-attention rule (lasp accumulates in float32)."""
    hf = _hf()
    cfg = tiny_config()
    model = make_model(cfg, F64, seed=51)
    ids = ids_for(2, 45, seed=4)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        model.to(torch.bfloat16)
        lowp = model(ids, use_cache=False).logits
        hf.patch_minimax(model)
        got = model(ids, use_cache=False).logits
    assert got.dtype == torch.bfloat16 and len(count_lasp_calls) == cfg.layer_types.count(LIN)
    err, lowp_err = rel_err(got, want), rel_err(lowp, want)
    assert err <= 2 * lowp_err + 8e-3, f"bf16 logits: error {err:.3e} vs unpatched bf16 {lowp_err:.3e}"


def test_linear_only_model_and_no_decay_tables_used():
    """All-linear model; the original's block tables are poisoned after patching: lasp must not read them."""
    hf = _hf()
    cfg = tiny_config(layer_types=(LIN, LIN, LIN), block_size=8)
    model = make_model(cfg, F64, seed=3)
    ids = ids_for(1, 29, seed=5)
    w = cotangent(1, 29, cfg.vocab_size, F64, seed=5)
    want_logits, want_grads = run(model, ids, w, use_cache=False)
    hf.patch_minimax(model)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "query_decay"):
                for b in (m.query_decay, m.key_decay, m.diagonal_decay):
                    b.fill_(float("nan"))
    got_logits, got_grads = run(model, ids, w, use_cache=False)
    assert_close("logits", got_logits, want_logits, F64)
    assert_same_grads(got_grads, want_grads, F64)


def test_padding_mask():
    hf = _hf()
    cfg = tiny_config()
    model = make_model(cfg, F64, seed=21)
    N = 23
    ids = ids_for(2, N, seed=8)
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, :6] = 0  # left padding on the second row
    w = cotangent(2, N, cfg.vocab_size, F64, seed=8) * mask[:, :, None]
    want_logits, want_grads = run(model, ids, w, attention_mask=mask, use_cache=False)
    hf.patch_minimax(model)
    got_logits, got_grads = run(model, ids, w, attention_mask=mask, use_cache=False)
    keep = mask.bool()
    assert_close("logits (unpadded positions)", got_logits[keep], want_logits[keep], F64)
    assert_same_grads(got_grads, want_grads, F64)


def _steps(model, ids, chunks):
    """Prefill / chunked prefill / decode through the MiniMax cache; logits of every step."""
    out, pkv, start = [], None, 0
    for c in chunks:
        r = model(ids[:, start : start + c], past_key_values=pkv, use_cache=True)
        pkv = r.past_key_values
        out.append(r.logits)
        start += c
    return out, pkv


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
def test_generation_cache(dtype, count_lasp_calls):
    """Prefill (20), chunked prefill from a cache (13), then single-token decode: logits of every step
    and the cached linear states equal the unpatched model's."""
    hf = _hf()
    cfg = tiny_config()
    model = make_model(cfg, dtype, seed=31)
    ids = ids_for(2, 36, seed=9)
    chunks = [20, 13, 1, 1, 1]
    with torch.no_grad():
        want, want_pkv = _steps(model, ids, chunks)
        hf.patch_minimax(model)
        got, got_pkv = _steps(model, ids, chunks)
    assert len(count_lasp_calls) == len(chunks) * cfg.layer_types.count(LIN)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"logits of step {i} ({chunks[i]} tokens)", g, w, dtype)
    for li, t in enumerate(cfg.layer_types):
        if t == LIN:
            gs, ws = got_pkv.get_linear_cache(li), want_pkv.get_linear_cache(li)
            assert gs.dtype == ws.dtype and gs.shape == ws.shape
            assert_close(f"linear cache of layer {li}", gs, ws, dtype)
    # greedy generation through GenerationMixin gives the same tokens
    prompt = ids[:, :12]
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    got_tokens = model.generate(prompt, **kw)
    hf.unpatch_minimax(model)
    want_tokens = model.generate(prompt, **kw)
    assert torch.equal(got_tokens, want_tokens)


def test_unpatch_restores_original(count_lasp_calls):
    hf = _hf()
    cfg = tiny_config()
    model = make_model(cfg, F32, seed=41)
    ids = ids_for(1, 19, seed=2)
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        assert not hf.is_patched(model)
        hf.patch_minimax(model)
        assert hf.is_patched(model)
        with pytest.raises(RuntimeError, match="already patched"):
            hf.patch_minimax(model)
        hf.unpatch_minimax(model)
        assert not hf.is_patched(model)
        n_calls = len(count_lasp_calls)
        after = model(ids, use_cache=False).logits
    assert len(count_lasp_calls) == n_calls == 0
    assert torch.equal(before, after), "unpatched model does not compute what it did before patching"
    for m in model.modules():
        assert "forward" not in m.__dict__ and not any(k.startswith("_lasp") for k in m.__dict__), type(m).__name__
        assert not m._forward_pre_hooks, type(m).__name__
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch_minimax(model)


def test_patched_model_copies_and_pickles(count_lasp_calls):
    """A patched model survives copy.deepcopy (EMA / reference copies) and torch.save / torch.load: the copy
    is patched, computes what the original computes, through lasp, and unpatches on its own."""
    hf = _hf()
    model = make_model(tiny_config(), F32, seed=43)
    ids = ids_for(2, 21, seed=3)
    hf.patch_minimax(model)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = {"deepcopy": copy.deepcopy(model), "torch.save/load": torch.load(buf, weights_only=False)}
    for how, other in copies.items():
        assert hf.is_patched(other), how
        n = len(count_lasp_calls)
        with torch.no_grad():
            got = other(ids, use_cache=False).logits
        assert len(count_lasp_calls) > n, f"{how}: the copy did not run lasp"
        assert torch.equal(got, want), f"{how}: the copy computes something else"
        # the copy's layers are its own (a deepcopy must not drive the original's modules)
        mods = {id(m) for m in model.modules()}
        assert not any(id(m) in mods for m in other.modules()), how
        hf.unpatch_minimax(other)
        assert not hf.is_patched(other) and hf.is_patched(model), how
        with torch.no_grad():  # transformers' own code again: equal up to the rounding of another algorithm
            assert_close(f"{how}, unpatched: logits", other(ids, use_cache=False).logits, want, F32)
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, want), "copying changed the original"


def test_patch_entry_point_dispatches(count_lasp_calls):
    hf = _hf()
    model = make_model(tiny_config(), F32, seed=44)
    ids = ids_for(1, 23, seed=4)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        assert hf.patch(model) is model and hf.is_patched(model)
        got = model(ids, use_cache=False).logits
    assert count_lasp_calls, "patch() did not swap in lasp"
    assert_close("logits through patch()", got, want, F32)
    assert hf.unpatch(model) is model and not hf.is_patched(model)
    with pytest.raises(ValueError, match="minimax"):
        hf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hf.patch("model")


def test_refuses_other_versions(monkeypatch):
    hf = _hf()
    model = make_model(tiny_config(), F32, seed=1)
    import transformers as tf_now  # transformers' lazy module may have replaced itself in sys.modules

    monkeypatch.setattr(tf_now, "__version__", "4.0.0")
    with pytest.raises(RuntimeError, match=r"supports transformers 5\.16\.0, .*5\.17\.0, .*5\.22\.2, found 4\.0\.0"):
        hf.patch_minimax(model)
    assert not hf.is_patched(model)
    hf.patch_minimax(model, allow_untested_version=True)  # structural checks pass on this code
    hf.unpatch_minimax(model)


def test_fingerprints_per_release(monkeypatch):
    """Each supported release has its own fingerprints: the installed MiniMax code passes under its own
    version number and is refused under a release whose code differs (5.17.0 and 5.22.2 differ in
    MiniMaxLightningAttention.forward)."""
    hf = _hf()
    import transformers as tf_now

    assert set(hf.SUPPORTED_TRANSFORMERS) >= {"5.16.0", "5.17.0", "5.18.0", "5.22.2"}
    assert all(len(fp) == 4 for fp in hf._FINGERPRINTS.values())
    installed = tf_now.__version__
    assert installed in hf.SUPPORTED_TRANSFORMERS, f"the test environment's transformers {installed} is not supported"
    other = "5.22.2" if hf._FINGERPRINTS[installed] == hf._FINGERPRINTS["5.17.0"] else "5.17.0"
    model = make_model(tiny_config(), F32, seed=1)
    monkeypatch.setattr(tf_now, "__version__", other)
    with pytest.raises(RuntimeError, match=rf"MiniMaxLightningAttention\.forward differs from the released transformers {other}"):
        hf.patch_minimax(model)
    assert not hf.is_patched(model)


def test_refuses_changed_model_code(monkeypatch):
    hf = _hf()
    from transformers.models.minimax import modeling_minimax as mm

    model = make_model(tiny_config(), F32, seed=1)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(mm.MiniMaxLightningAttention, "forward", forward)
    with pytest.raises(RuntimeError, match=r"MiniMaxLightningAttention\.forward takes .* 5\.17\.0"):
        hf.patch_minimax(model, allow_untested_version=True)
    monkeypatch.undo()
    del model.model.layers[0].self_attn.slope_rate
    with pytest.raises(RuntimeError, match="no attribute 'slope_rate'"):
        hf.patch_minimax(model)
    assert not hf.is_patched(model)


def test_refuses_models_without_lightning_attention():
    hf = _hf()
    with pytest.raises(ValueError, match="no MiniMaxLightningAttention"):
        hf.patch_minimax(torch.nn.Linear(2, 2))


def test_refuses_bad_sp_strategy():
    hf = _hf()
    model = make_model(tiny_config(), F32, seed=1)
    for bad in ("rnig", "scan:2", None):
        with pytest.raises(ValueError, match=r"sp_strategy must be one of .*'scan', 'auto'\), got"):
            hf.patch(model, sp_strategy=bad)
        assert not hf.is_patched(model)


# ----------------------------------------------------------------------------------------------
# Sequence parallel (gloo, CPU)

# Each case: one model and one batch; the sequence is split into `pieces` (one per group rank, in order).
# One spawn of 3 processes runs every case: the 2-way cases on the subgroup {0, 1} (so sp_group need not
# be WORLD), the 3-way ones on WORLD, and the first 2-way case again on the subgroup {1, 2}, whose group
# ranks are not the global ones (the backward of the K/V gather must address the group's members).
# (One spawn: each process pays ~4 s of imports on 2 cores.)
SP_WORLD = 3
SP_CASES = {
    2: [
        dict(dtype=F64, layer_types=(LIN, FULL, LIN, FULL), B=2, pieces=[20, 17], cfg={}),
        dict(dtype=F32, layer_types=(FULL, LIN, LIN), B=1, pieces=[9, 24], cfg=dict(sliding_window=8)),
        # packed documents (position ids restarting at 0): one starts exactly on the rank boundary, one has 1 token
        dict(dtype=F64, layer_types=(LIN, FULL, LIN), B=1, pieces=[15, 14], cfg={}, docs=[4, 11, 1, 9, 4]),
    ],
    3: [
        dict(dtype=F64, layer_types=(LIN, FULL, LIN), B=1, pieces=[13, 1, 23], cfg=dict(num_key_value_heads=1)),
        # a document over all three pieces (the middle one of 1 token)
        dict(dtype=F64, layer_types=(LIN, FULL, LIN), B=2, pieces=[12, 1, 20], cfg={}, docs=[3, 20, 10]),
    ],
}


def packed_positions(docs, B):
    """(B, sum(docs)) position ids restarting at 0 at every document, as DataCollatorWithFlattening makes them."""
    pos = torch.cat([torch.arange(n) for n in docs])
    return pos.unsqueeze(0).expand(B, -1).contiguous()


def _sp_setup(size, ci):
    case = SP_CASES[size][ci]
    cfg = tiny_config(case["layer_types"], **case["cfg"])
    seed = 100 * size + ci
    N = sum(case["pieces"])
    return case, cfg, make_model(cfg, case["dtype"], seed), ids_for(case["B"], N, seed), cotangent(
        case["B"], N, cfg.vocab_size, case["dtype"], seed
    )


def _sp_worker(rank, world, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    torch.set_num_threads(1)
    hf = _hf()
    sub12 = dist.new_group([1, 2])  # new_group: called by every rank
    groups = {2: dist.new_group([0, 1]), 3: dist.group.WORLD}
    results = {}
    if rank in (1, 2):  # the subgroup {1, 2}: group rank = global rank - 1
        case, cfg, model, ids, w = _sp_setup(2, 0)
        gr = rank - 1
        P, n = sum(case["pieces"][:gr]), case["pieces"][gr]
        hf.patch_minimax(model, sp_group=sub12)
        try:
            results[("sub12", 0)] = dict(zip(("logits", "grads"), run(model, ids[:, P : P + n], w[:, P : P + n])))
        except Exception as e:  # recorded, so that the test reports it (and the other rank is not left waiting)
            results[("sub12", 0)] = dict(error=f"{type(e).__name__}: {e}")
        hf.unpatch_minimax(model)
    for size, group in groups.items():
        if rank >= size:
            continue
        for ci in range(len(SP_CASES[size])):
            case, cfg, model, ids, w = _sp_setup(size, ci)
            P = sum(case["pieces"][:rank])
            n = case["pieces"][rank]
            hf.patch_minimax(model, sp_group=group)
            kw = {}
            if "docs" in case:
                kw["position_ids"] = packed_positions(case["docs"], case["B"])[:, P : P + n]
            logits, grads = run(model, ids[:, P : P + n], w[:, P : P + n], **kw)
            results[(size, ci)] = dict(logits=logits, grads=grads)
            if ci == 0:
                # the lightning layers' states passed by the scan instead of the ring
                hf.unpatch_minimax(model)
                hf.patch_minimax(model, sp_group=group, sp_strategy="scan")
                results[(size, "scan")] = run(model, ids[:, P : P + n], w[:, P : P + n], **kw)[0]
                hf.unpatch_minimax(model)
                hf.patch_minimax(model, sp_group=group)
                # a deepcopy (EMA / reference model) runs patched on the same group and computes the same
                twin = copy.deepcopy(model)
                with torch.no_grad():
                    results[(size, "copy")] = twin(ids[:, P : P + n]).logits
                # pickled: the group does not survive, and the loaded model says so instead of running alone
                buf = io.BytesIO()
                torch.save(model, buf)
                buf.seek(0)
                loaded = torch.load(buf, weights_only=False)
                try:
                    loaded(ids[:, P : P + n])
                    results[(size, "pickled")] = None
                except RuntimeError as e:
                    results[(size, "pickled")] = str(e)
                # padding on group rank 0 only: every rank must raise (before the fix the others waited in
                # the next collective until the process-group timeout)
                mask = torch.ones(case["B"], n, dtype=torch.long)
                if rank == 0:
                    mask[:, 0] = 0
                try:
                    model(ids[:, P : P + n], attention_mask=mask)
                    results[(size, "pad_one")] = None
                except (RuntimeError, ValueError) as e:
                    results[(size, "pad_one")] = str(e)
                # what the integration refuses under a group (raised before any collective, on every rank)
                errs = {}
                pad = torch.ones(case["B"], n, dtype=torch.long)
                pad[:, 0] = 0
                for what, kw in (("use_cache", dict(use_cache=True)), ("padding", dict(attention_mask=pad))):
                    try:
                        model(ids[:, P : P + n], **kw)
                        errs[what] = None
                    except (RuntimeError, ValueError) as e:
                        errs[what] = str(e)
                results[(size, "errors")] = errs
            hf.unpatch_minimax(model)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _spawn():
    """Run the workers once per session; a failure is re-raised by every test that needs them."""
    return spawn_once(_sp_worker, SP_WORLD, SPAWN_DEADLINE_S,
                      f"sequence-parallel MiniMax test (gloo, {SP_WORLD} processes)")


@pytest.mark.parametrize("size", [2, 3], ids=["2ranks", "3ranks"])
def test_sequence_parallel_matches_single_process(size):
    ranks = _spawn()[:size]
    for ci in range(len(SP_CASES[size])):
        case, cfg, model, ids, w = _sp_setup(size, ci)
        dtype = case["dtype"]
        if "docs" in case:  # packed: the model patched without a group (test_packed_documents_match_separate_runs)
            _hf().patch_minimax(model)
            want_logits, want_grads = run(model, ids, w, use_cache=False,
                                          position_ids=packed_positions(case["docs"], case["B"]))
            _hf().unpatch_minimax(model)
        else:
            want_logits, want_grads = run(model, ids, w, use_cache=False)  # unpatched, whole sequence
        got_logits = torch.cat([r[(size, ci)]["logits"] for r in ranks], dim=1)
        assert_close(f"case {ci}: logits (ranks concatenated)", got_logits, want_logits, dtype)
        res = [r[(size, ci)]["grads"] for r in ranks]
        names = set().union(*res)
        got_grads = {n: sum(g[n] for g in res if n in g) for n in names}
        assert_same_grads(got_grads, want_grads, dtype, what=f"case {ci}: summed over ranks: ")
    for r, res in enumerate(ranks):
        errs = res[(size, "errors")]
        assert errs["use_cache"] is not None and "sequence-parallel" in errs["use_cache"], f"rank {r}: {errs}"
        assert errs["padding"] is not None and "padding" in errs["padding"], f"rank {r}: {errs}"
        assert torch.equal(res[(size, "copy")], res[(size, 0)]["logits"]), f"rank {r}: the deepcopy computes otherwise"
        assert_close(f"rank {r}: logits with sp_strategy='scan'", res[(size, "scan")], res[(size, 0)]["logits"],
                     SP_CASES[size][0]["dtype"])
        assert res[(size, "pickled")] is not None and "pickled" in res[(size, "pickled")], f"rank {r}"
        pad = res[(size, "pad_one")]
        assert pad is not None and "padding" in pad and "group ranks [0]" in pad, f"rank {r}: {pad}"


@pytest.mark.parametrize("layer_types", [(LIN, FULL, LIN), (LIN, LIN)], ids=["hybrid", "linear-only"])
def test_packed_documents_match_separate_runs(layer_types, count_lasp_calls):
    """Documents packed into a row (position ids restarting at 0) give the logits of each document run alone,
    and the gradients of the sum of their losses: the lightning layers reset their state at every document
    start (transformers' own full-attention mask separates them too). Row 1 is not packed."""
    hf = _hf()
    dtype = F64
    cfg = tiny_config(layer_types)
    model = make_model(cfg, dtype, seed=7)
    docs = [5, 1, 9, 2, 17]
    N = sum(docs)
    ids = ids_for(2, N, seed=8)
    w = cotangent(2, N, cfg.vocab_size, dtype, seed=9)
    pos = torch.stack([packed_positions(docs, 1)[0], torch.arange(N)])
    hf.patch_minimax(model)
    # use_cache=False: transformers reads packed position ids only without a cache (masking_utils)
    got_logits, got_grads = run(model, ids, w, position_ids=pos, use_cache=False)
    assert len(count_lasp_calls) == layer_types.count(LIN)
    want_logits = torch.empty_like(got_logits)
    want_grads = {}
    starts = [0]
    for n in docs:
        starts.append(starts[-1] + n)
    pieces = [(0, starts[i], n) for i, n in enumerate(docs)] + [(1, 0, N)]
    for row, c0, n in pieces:
        logits, grads = run(model, ids[row : row + 1, c0 : c0 + n], w[row : row + 1, c0 : c0 + n])
        want_logits[row, c0 : c0 + n] = logits[0]
        for k, v in grads.items():
            want_grads[k] = want_grads[k] + v if k in want_grads else v
    assert_close("logits (packed vs each document alone)", got_logits, want_logits, dtype)
    assert_same_grads(got_grads, want_grads, dtype, what="packed vs documents alone: ")
    # the check can fail: transformers' own lightning attention lets the packed documents see each other
    hf.unpatch_minimax(model)
    leaky, _ = run(model, ids, w, position_ids=pos, use_cache=False)
    assert rel_err(leaky[0], want_logits[0]) > 100 * TOL[dtype]


def test_sequence_parallel_subgroup_without_rank0():
    """sp_group = global ranks {1, 2}: forward and backward (the K/V gather's backward) match the
    single-process model."""
    ranks = _spawn()[1:3]
    case, cfg, model, ids, w = _sp_setup(2, 0)
    for r, res in zip((1, 2), ranks):
        assert "error" not in res[("sub12", 0)], f"global rank {r}: {res[('sub12', 0)]['error']}"
    want_logits, want_grads = run(model, ids, w, use_cache=False)
    got_logits = torch.cat([r[("sub12", 0)]["logits"] for r in ranks], dim=1)
    assert_close("logits (ranks concatenated)", got_logits, want_logits, case["dtype"])
    res = [r[("sub12", 0)]["grads"] for r in ranks]
    names = set().union(*res)
    got_grads = {n: sum(g[n] for g in res if n in g) for n in names}
    assert_same_grads(got_grads, want_grads, case["dtype"], what="summed over ranks: ")


# ----------------------------------------------------------------------------------------------
# Sequence parallel (nccl, one GPU per rank)

# One spawn per group size over all of its GPUs (WORLD). float32 cases check logits and every gradient at
# the float32 tolerance; the bfloat16 case (head_dim 64: lasp's tensor-core path) checks logits with the
# rule of test_bfloat16_no_worse_than_unpatched (at most 2x the unpatched bf16 model's distance to the
# float64 model, plus 8e-3). The unpatched whole-sequence models run on cuda:0 in this process.
_NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
NCCL_SP_CASES = {
    2: [
        dict(dtype=F32, layer_types=(LIN, FULL, LIN, FULL), B=2, pieces=[70, 59], cfg={}),
        dict(dtype=F32, layer_types=(FULL, LIN, LIN), B=1, pieces=[9, 56], cfg=dict(sliding_window=8)),
        dict(dtype=torch.bfloat16, layer_types=(LIN, FULL, LIN), B=2, pieces=[130, 67],
             cfg=dict(head_dim=64, hidden_size=128, num_attention_heads=2)),
    ],
    4: [
        dict(dtype=F32, layer_types=(LIN, FULL, LIN), B=1, pieces=[13, 1, 23, 40], cfg=dict(num_key_value_heads=1)),
        dict(dtype=F32, layer_types=(LIN, LIN, FULL, LIN), B=2, pieces=[64, 65, 17, 33], cfg=dict(sliding_window=20)),
        dict(dtype=torch.bfloat16, layer_types=(LIN, FULL, LIN), B=1, pieces=[100, 64, 1, 90],
             cfg=dict(head_dim=64, hidden_size=128, num_attention_heads=2)),
    ],
}


def _nccl_setup(size, ci, device):
    case = NCCL_SP_CASES[size][ci]
    cfg = tiny_config(case["layer_types"], **case["cfg"])
    seed = 1000 + 100 * size + ci
    N = sum(case["pieces"])
    build_dtype = F64 if case["dtype"] == torch.bfloat16 else case["dtype"]  # bf16: cast from the float64 model
    model = make_model(cfg, build_dtype, seed).to(device)
    ids = ids_for(case["B"], N, seed).to(device)
    w = cotangent(case["B"], N, cfg.vocab_size, F32, seed).to(device)
    return case, cfg, model, ids, w


def _sp_worker_nccl(rank, world, port, out_dir):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S), device_id=device)
    hf = _hf()
    results = {}
    for ci, case in enumerate(NCCL_SP_CASES[world]):
        case, cfg, model, ids, w = _nccl_setup(world, ci, device)
        P, n = sum(case["pieces"][:rank]), case["pieces"][rank]
        if case["dtype"] == torch.bfloat16:
            model.to(torch.bfloat16)
        hf.patch_minimax(model, sp_group=dist.group.WORLD)
        if case["dtype"] == torch.bfloat16:
            with torch.no_grad():
                logits = model(ids[:, P : P + n]).logits
            results[ci] = dict(logits=logits.cpu(), grads=None)
        else:
            logits, grads = run(model, ids[:, P : P + n], w[:, P : P + n].to(case["dtype"]))
            results[ci] = dict(logits=logits.cpu(), grads={k: g.cpu() for k, g in grads.items()})
        hf.unpatch_minimax(model)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _spawn_nccl(world):
    return spawn_once(_sp_worker_nccl, world, 2 * SPAWN_DEADLINE_S,
                      f"sequence-parallel MiniMax test (nccl, {world} GPUs)")


@pytest.mark.parametrize("size", [2, 4], ids=["sp2", "sp4"])
def test_sequence_parallel_nccl_matches_unpatched(size):
    """sp=2 and sp=4 over NCCL (one GPU per rank): logits concatenated over ranks and gradients summed over
    ranks equal the unpatched model on the whole sequence (cuda:0)."""
    if _NGPU < size:
        pytest.skip(f"needs {size} CUDA devices for nccl, found {_NGPU}")
    if not dist.is_nccl_available():
        pytest.skip("nccl not available")
    ranks = _spawn_nccl(size)
    device = torch.device("cuda", 0)
    for ci, case in enumerate(NCCL_SP_CASES[size]):
        case, cfg, model, ids, w = _nccl_setup(size, ci, device)
        got_logits = torch.cat([r[ci]["logits"] for r in ranks], dim=1)
        if case["dtype"] == torch.bfloat16:
            with torch.no_grad():
                want = model(ids, use_cache=False).logits  # float64, unpatched
                model.to(torch.bfloat16)
                lowp = model(ids, use_cache=False).logits  # bfloat16, unpatched
            err, lowp_err = rel_err(got_logits, want), rel_err(lowp, want)
            assert err <= 2 * lowp_err + 8e-3, (
                f"case {ci} (bf16, sp={size}): logits error {err:.3e} vs unpatched bf16 {lowp_err:.3e}")
            continue
        dtype = case["dtype"]
        want_logits, want_grads = run(model, ids, w.to(dtype), use_cache=False)
        assert_close(f"case {ci} (sp={size}): logits (ranks concatenated)", got_logits, want_logits, dtype)
        res = [r[ci]["grads"] for r in ranks]
        names = set().union(*res)
        got_grads = {n: sum(g[n] for g in res if n in g) for n in names}
        assert_same_grads(got_grads, {n: g.cpu() for n, g in want_grads.items()}, dtype,
                          what=f"case {ci} (sp={size}): summed over ranks: ")
