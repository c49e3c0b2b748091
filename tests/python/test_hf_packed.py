"""lasp.integrations.hf with transformers' packed-batch keyword arguments (cu_seq_lens_q / cu_seq_lens_k /
max_length_q / max_length_k, as DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes them).

Tiny random-weight MiniMax models (test_hf.py's configs), float64. A packed row called with the offsets gives
the logits of each document run alone through the unpatched model, and the gradients of the sum of their
losses; it equals the position-id path; the patched layers called on their own do the same; bad calls raise
errors naming their arguments. Under sequence parallelism (gloo, 2 processes) the offsets are the global
ones of the whole row, the same on every rank, and a bad call on any rank raises on every rank.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch

pytest.importorskip(
    "transformers", reason="HuggingFace transformers is not installed (pip install transformers==5.17.0)"
)

import torch.distributed as dist  # noqa: E402

from conftest import rel_err, spawn_once  # noqa: E402
from test_hf import (  # noqa: E402
    F64, FULL, LIN, PG_TIMEOUT_S, SPAWN_DEADLINE_S, TOL, _hf, assert_close, assert_same_grads, cotangent, ids_for,
    make_model, packed_positions, run, tiny_config,
)
from test_hf import count_lasp_calls  # noqa: E402, F401 (a fixture)


def offsets(docs, dtype=torch.int32):
    """cu_seq_lens of documents of the given lengths: [0, n_1, n_1 + n_2, ..., N]."""
    cu = [0]
    for n in docs:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=dtype)


def flattened(ids, docs):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) on the documents of row 0 of ids."""
    from transformers import DataCollatorWithFlattening

    cu = offsets(docs).tolist()
    feats = [{"input_ids": ids[0, a:b].tolist()} for a, b in zip(cu[:-1], cu[1:])]
    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)(feats)


def packed_kwargs(docs):
    cu = offsets(docs)
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=max(docs), max_length_k=max(docs))


def separate_runs(model, ids, w, docs):
    """Each document of row 0 alone: its logits at its place in the row, the gradients summed."""
    logits_all = torch.empty(*ids.shape, w.shape[-1], dtype=w.dtype)
    grads_all = {}
    cu = offsets(docs).tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        logits, grads = run(model, ids[:, a:b], w[:, a:b], use_cache=False)
        logits_all[:, a:b] = logits
        for k, v in grads.items():
            grads_all[k] = grads_all[k] + v if k in grads_all else v
    return logits_all, grads_all


DOCS = [5, 1, 9, 2, 17]
SINGLE = {
    "hybrid": dict(layer_types=(LIN, FULL, LIN), cfg={}),
    "linear-only": dict(layer_types=(LIN, LIN), cfg={}),
    "sliding-window": dict(layer_types=(FULL, LIN, FULL), cfg=dict(sliding_window=4)),
}


# ----------------------------------------------------------------------------------------------
# Single process


@pytest.mark.parametrize("name", list(SINGLE))
def test_cu_seq_lens_match_separate_runs(name, count_lasp_calls):
    """The collator's output (offsets and position ids), the offsets alone (position ids then made from them,
    cache left at the config's default) and the position ids alone all give each document's own logits and
    the summed gradients of the documents run alone (unpatched)."""
    hf = _hf()
    spec = SINGLE[name]
    cfg = tiny_config(spec["layer_types"], **spec["cfg"])
    model = make_model(cfg, F64, seed=17)
    N = sum(DOCS)
    ids = ids_for(1, N, seed=3)
    w = cotangent(1, N, cfg.vocab_size, F64, seed=4)
    want_logits, want_grads = separate_runs(model, ids, w, DOCS)

    batch = flattened(ids, DOCS)
    assert torch.equal(batch["input_ids"], ids)
    hf.patch(model)
    n_lin = cfg.layer_types.count(LIN)
    calls = {
        "collator (offsets and position ids)": {k: v for k, v in batch.items() if k not in ("input_ids", "labels")},
        "offsets only": packed_kwargs(DOCS),
        "offsets only, int64": dict(cu_seq_lens_q=offsets(DOCS, torch.int64)),
        "position ids only": dict(position_ids=packed_positions(DOCS, 1), use_cache=False),
        "position ids, the config's default cache and a mask of ones":
            dict(position_ids=packed_positions(DOCS, 1), attention_mask=torch.ones(1, N, dtype=torch.long)),
    }
    got = {}
    for what, kw in calls.items():
        before = len(count_lasp_calls)
        got[what] = run(model, ids, w, **kw)
        assert len(count_lasp_calls) == before + n_lin, f"{what}: the patched forward did not call lasp_attention"
        assert_close(f"{what}: logits vs each document alone", got[what][0], want_logits, F64)
        assert_same_grads(got[what][1], want_grads, F64, what=f"{what} vs each document alone: ")
    ref = got["position ids only"]
    for what in calls:
        assert_close(f"{what}: logits vs the position-id path", got[what][0], ref[0], F64)
    # labels too: model(**batch) gives the loss of the position-id path
    with torch.no_grad():
        loss = model(**batch).loss
        want_loss = model(ids, labels=batch["labels"], position_ids=batch["position_ids"], use_cache=False).loss
    assert torch.isfinite(loss) and rel_err(loss, want_loss) <= TOL[F64]
    # the check can fail: transformers' own model does not keep the documents apart with these arguments
    hf.unpatch(model)
    leaky, _ = run(model, ids, w, **packed_kwargs(DOCS))
    assert rel_err(leaky, want_logits) > 100 * TOL[F64]


def test_packed_position_ids_refusals():
    """Restarting position ids on a model with full-attention layers: a cache asked for, or a padding mask with a
    document start between two unpadded tokens, is refused by name (transformers' mask would let the documents
    see each other); a restart next to padding (left-padded rows) is transformers' padding mask, as given."""
    hf = _hf()
    cfg = tiny_config((LIN, FULL, LIN))
    model = make_model(cfg, F64, seed=5)
    hf.patch(model)
    N = sum(DOCS)
    ids = ids_for(1, N, seed=3)
    pos = packed_positions(DOCS, 1)
    with pytest.raises(ValueError, match=r"position_ids restart .* cache was asked for"):
        model(ids, position_ids=pos, use_cache=True)
    mask = torch.ones(1, N, dtype=torch.long)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match=r"position_ids restart at token 5 of row 0 .* attention_mask has zeros"):
        model(ids, position_ids=pos, attention_mask=mask, use_cache=False)
    # left padding: positions restart right after the padded tokens only
    left = torch.tensor([[0, 0, 1, 1, 1, 1]])
    lpos = torch.tensor([[0, 0, 0, 1, 2, 3]])
    with torch.no_grad():
        out = model(ids[:, :6], position_ids=lpos, attention_mask=left, use_cache=False).logits
    assert torch.isfinite(out).all()


def test_single_document_and_one_token_documents(count_lasp_calls):
    """One document (no reset) and mostly one-token documents (one has 3 tokens: were all of one token, the
    full-attention layers' query projections would get a zero gradient, which a relative error cannot compare)."""
    hf = _hf()
    cfg = tiny_config((LIN, FULL, LIN))
    model = make_model(cfg, F64, seed=5)
    for docs in ([13], [1, 1, 3, 1, 1]):
        N = sum(docs)
        ids = ids_for(1, N, seed=N)
        w = cotangent(1, N, cfg.vocab_size, F64, seed=N)
        want_logits, want_grads = separate_runs(model, ids, w, docs)
        hf.patch_minimax(model)
        got_logits, got_grads = run(model, ids, w, **packed_kwargs(docs))
        hf.unpatch_minimax(model)
        assert_close(f"{docs}: logits", got_logits, want_logits, F64)
        assert_same_grads(got_grads, want_grads, F64, what=f"{docs}: ")


def test_patched_layers_called_alone(count_lasp_calls):
    """The patched lightning layer, called on its own with the offsets (and with agreeing position ids), gives
    each document's output run alone; without them it runs the documents together."""
    hf = _hf()
    cfg = tiny_config((LIN,))
    model = make_model(cfg, F64, seed=9)
    layer = model.model.layers[0].self_attn
    N = sum(DOCS)
    h = torch.randn(1, N, cfg.hidden_size, dtype=F64, generator=torch.Generator().manual_seed(2))
    hf.patch_minimax(model)
    cu = offsets(DOCS).tolist()
    with torch.no_grad():
        want = torch.cat([layer(h[:, a:b], None, None)[0] for a, b in zip(cu[:-1], cu[1:])], dim=1)
        got = layer(h, None, None, **packed_kwargs(DOCS))[0]
        got_pos = layer(h, None, None, position_ids=packed_positions(DOCS, 1), **packed_kwargs(DOCS))[0]
        together = layer(h, None, None)[0]
    assert_close("layer output (offsets)", got, want, F64)
    assert_close("layer output (offsets and position ids)", got_pos, want, F64)
    assert rel_err(together, want) > 100 * TOL[F64]
    with pytest.raises(ValueError, match="position_ids and cu_seq_lens_q disagree"):
        layer(h, None, None, position_ids=torch.arange(N)[None], **packed_kwargs(DOCS))
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k must be equal"):
        layer(h, None, None, cu_seq_lens_q=offsets(DOCS), cu_seq_lens_k=offsets([N]))
    with pytest.raises(ValueError, match="cu_seq_lens_q .*past_key_values"):
        from transformers.models.minimax.modeling_minimax import MiniMaxCache

        layer(h, None, None, past_key_values=MiniMaxCache(), **packed_kwargs(DOCS))


def test_errors_name_their_arguments():
    hf = _hf()
    cfg = tiny_config((LIN, FULL, LIN))
    model = make_model(cfg, F64, seed=1)
    N = sum(DOCS)
    ids = ids_for(1, N, seed=1)
    cu = offsets(DOCS)
    hf.patch_minimax(model)
    bad = [
        (dict(input_ids=ids.expand(2, -1), cu_seq_lens_q=cu), ValueError,
         r"cu_seq_lens_q .*batch size 1; got batch size 2"),
        (dict(cu_seq_lens_q=cu, cu_seq_lens_k=offsets([4, 2, 9, 2, 17])), ValueError,
         r"cu_seq_lens_q and cu_seq_lens_k must be equal"),
        (dict(cu_seq_lens_k=cu), ValueError, r"cu_seq_lens_k was given without cu_seq_lens_q"),
        (dict(cu_seq_lens_q=cu, position_ids=torch.arange(N)[None]), ValueError,
         r"position_ids and cu_seq_lens_q disagree .* at token 5 .*do not restart"),
        (dict(cu_seq_lens_q=offsets([5, 10, 2, 17]), position_ids=packed_positions(DOCS, 1)), ValueError,
         r"position_ids and cu_seq_lens_q disagree .* at token 6 .*inside document 1, which starts at token 5"),
        (dict(cu_seq_lens_q=cu.float()), TypeError, r"cu_seq_lens_q must hold int32 or int64"),
        (dict(cu_seq_lens_q=cu[None]), ValueError, r"cu_seq_lens_q must be 1-D"),
        (dict(cu_seq_lens_q=cu + 1), ValueError, r"cu_seq_lens_q must start at 0"),
        (dict(cu_seq_lens_q=offsets([5, 0, 29])), ValueError, r"cu_seq_lens_q must be strictly increasing"),
        (dict(cu_seq_lens_q=offsets([5, 1, 9])), ValueError,
         r"last offset of cu_seq_lens_q \(15\) must equal the packed length \(34\)"),
        (dict(cu_seq_lens_q=cu, use_cache=True), ValueError, r"cu_seq_lens_q .*cache"),
        (dict(cu_seq_lens_q=cu, attention_mask=torch.cat([torch.zeros(1, 1), torch.ones(1, N - 1)], 1).long()),
         ValueError, r"cu_seq_lens_q .*attention_mask must be None or a 2-D mask of ones"),
    ]
    for kw, exc, match in bad:
        kw.setdefault("input_ids", ids)
        with pytest.raises(exc, match=match):
            model(**kw)
    # an all-ones mask is no padding: accepted (and the same as none)
    with torch.no_grad():
        a = model(ids, cu_seq_lens_q=cu).logits
        b = model(ids, cu_seq_lens_q=cu, attention_mask=torch.ones(1, N, dtype=torch.long)).logits
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Sequence parallel (gloo, 2 processes, CPU)

# docs: the packed documents; pieces: the contiguous piece of each group rank.
SP_CASES = [
    # a document starts exactly on the rank boundary, one has a single token
    dict(layer_types=(LIN, FULL, LIN), pieces=[15, 14], docs=[4, 11, 1, 9, 4], cfg={}),
    # a document spans the boundary; sliding window in the full-attention layer
    dict(layer_types=(FULL, LIN, LIN), pieces=[9, 24], docs=[3, 12, 18], cfg=dict(sliding_window=5)),
]
SP_WORLD = 2


def _sp_setup(ci):
    case = SP_CASES[ci]
    cfg = tiny_config(case["layer_types"], **case["cfg"])
    N = sum(case["pieces"])
    seed = 500 + ci
    return case, cfg, make_model(cfg, F64, seed), ids_for(1, N, seed), cotangent(1, N, cfg.vocab_size, F64, seed)


def _try(fn):
    try:
        fn()
        return None
    except (RuntimeError, ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"


def _sp_worker(rank, world, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    torch.set_num_threads(1)
    hf = _hf()
    group = dist.group.WORLD
    results = {}
    for ci, case in enumerate(SP_CASES):
        case, cfg, model, ids, w = _sp_setup(ci)
        P, n = sum(case["pieces"][:rank]), case["pieces"][rank]
        piece, wp = ids[:, P : P + n], w[:, P : P + n]
        kw = packed_kwargs(case["docs"])  # the global offsets, the same on every rank
        hf.patch_minimax(model, sp_group=group)
        results[(ci, "offsets")] = run(model, piece, wp, **kw)
        pos = packed_positions(case["docs"], 1)[:, P : P + n]
        with torch.no_grad():
            results[(ci, "offsets+pos")] = model(piece, position_ids=pos, **kw).logits
            results[(ci, "pos")] = model(piece, position_ids=pos).logits
        if ci == 0:
            # the patched layers called on their own under the group
            lin, full = model.model.layers[0].self_attn, model.model.layers[1].self_attn
            h = torch.randn(1, sum(case["pieces"]), cfg.hidden_size, dtype=F64,
                            generator=torch.Generator().manual_seed(6))[:, P : P + n]
            with torch.no_grad():
                results["layer lin"] = lin(h, None, None, **kw)[0]
                pe = model.model.rotary_emb(h, pos)
                results["layer full"] = full(h, pe, None, **kw)[0]
            # bad calls: every rank raises (none is left waiting in a collective)
            other = offsets([4, 11, 10, 4])
            errs = {
                "differ": dict(cu_seq_lens_q=kw["cu_seq_lens_q"] if rank == 0 else other),
                "rank 0 only": dict(cu_seq_lens_q=kw["cu_seq_lens_q"]) if rank == 0 else {},
                "not the whole row": dict(cu_seq_lens_q=offsets([4, 11])),
                "positions": dict(kw, position_ids=pos if rank == 0 else torch.arange(P, P + n)[None]),
                "invalid on 1": dict(cu_seq_lens_q=kw["cu_seq_lens_q"] if rank == 0 else kw["cu_seq_lens_q"].float()),
                "batch": dict(cu_seq_lens_q=kw["cu_seq_lens_q"], input_ids=piece.expand(2, -1)),
                "cache": dict(cu_seq_lens_q=kw["cu_seq_lens_q"], use_cache=True),
            }
            for what, k in errs.items():
                k = dict(k)
                inp = k.pop("input_ids", piece)
                results[("error", what)] = _try(lambda: model(inp, **k))
            # the layer on its own: offsets on one rank only
            results[("error", "layer rank 0 only")] = _try(
                lambda: lin(h, None, None, **(kw if rank == 0 else {})))
            # and the group still works after all of these
            with torch.no_grad():
                results["after errors"] = model(piece, **kw).logits
        hf.unpatch_minimax(model)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _spawn():
    return spawn_once(_sp_worker, SP_WORLD, SPAWN_DEADLINE_S,
                      f"sequence-parallel packed MiniMax test (gloo, {SP_WORLD} processes)")


@pytest.mark.parametrize("ci", range(len(SP_CASES)))
def test_sequence_parallel_global_offsets_match_separate_runs(ci):
    """Each rank passes its piece and the global offsets: logits concatenated and gradients summed over the
    ranks equal each document run alone (unpatched, one process); with the pieces' position ids too, and with
    the position ids alone, the same logits."""
    ranks = _spawn()
    case, cfg, model, ids, w = _sp_setup(ci)
    want_logits, want_grads = separate_runs(model, ids, w, case["docs"])
    got_logits = torch.cat([r[(ci, "offsets")][0] for r in ranks], dim=1)
    assert_close("logits (ranks concatenated) vs each document alone", got_logits, want_logits, F64)
    res = [r[(ci, "offsets")][1] for r in ranks]
    got_grads = {k: sum(g[k] for g in res if k in g) for k in set().union(*res)}
    assert_same_grads(got_grads, want_grads, F64, what="summed over ranks vs each document alone: ")
    for what in ("offsets+pos", "pos"):
        assert_close(f"{what}: logits", torch.cat([r[(ci, what)] for r in ranks], dim=1), got_logits, F64)


def test_sequence_parallel_layers_called_alone():
    """The patched lightning and full-attention layers called on their own under the group with the global
    offsets equal each document through the layer alone (one process, the unpatched layers)."""
    ranks = _spawn()
    case, cfg, model, ids, w = _sp_setup(0)
    N = sum(case["pieces"])
    h = torch.randn(1, N, cfg.hidden_size, dtype=F64, generator=torch.Generator().manual_seed(6))
    lin, full = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    cu = offsets(case["docs"]).tolist()
    want_lin, want_full = [], []
    with torch.no_grad():
        for a, b in zip(cu[:-1], cu[1:]):
            want_lin.append(lin(h[:, a:b], None, None)[0])
            pe = model.model.rotary_emb(h[:, a:b], torch.arange(b - a)[None])
            want_full.append(full(h[:, a:b], pe, None)[0])
    assert_close("lightning layer", torch.cat([r["layer lin"] for r in ranks], 1), torch.cat(want_lin, 1), F64)
    assert_close("full-attention layer", torch.cat([r["layer full"] for r in ranks], 1), torch.cat(want_full, 1), F64)


def test_sequence_parallel_bad_calls_raise_on_every_rank():
    ranks = _spawn()
    expect = {
        "differ": r"cu_seq_lens_q must be the same on every rank .*group ranks \[1\]",
        "rank 0 only": r"cu_seq_lens_q / cu_seq_lens_k .* on every rank .* or on none; given on group ranks \[0\]",
        "not the whole row": r"last offset of cu_seq_lens_q \(15\) must equal the packed length \(29, the sum of the "
                     r"pieces' lengths",
        "positions": r"position_ids and cu_seq_lens_q disagree .*\(on group ranks \[1\]\): at token 16 ",
        "batch": r"cu_seq_lens_q .*batch size 1; got batch size 2",
        "cache": r"use_cache / past_key_values .* sequence-parallel",
        "layer rank 0 only": r"cu_seq_lens_q / cu_seq_lens_k .* or on none; given on group ranks \[0\]",
    }
    import re

    for r, res in enumerate(ranks):
        for what, pat in expect.items():
            msg = res[("error", what)]
            assert msg is not None and re.search(pat, msg), f"rank {r}, {what}: {msg}"
        msg = res[("error", "invalid on 1")]
        want = (r"TypeError: .*cu_seq_lens_q must hold int32 or int64.* \(group ranks \[1\]\)" if r == 1 else
                r"ValueError: .*cu_seq_lens_q is not valid on group ranks \[1\]")
        assert msg is not None and re.search(want, msg), f"rank {r}: {msg}"
        assert torch.equal(res["after errors"], res[(0, "offsets")][0]), f"rank {r}: the group broke after the errors"
