"""Shared helpers for the lasp Python tests.

Test modules import the helpers directly (``from conftest import ...``); the directory is put on
``sys.path`` below so that this also works under ``--import-mode=importlib`` and in processes
spawned by the distributed tests.

* ``ref``: the fp64 reference module (python/lasp/reference.py), loaded straight from its file so
  the reference tests run even when the compiled extension does not build.
* ``import_lasp()``: imports the real package. It raises (so the op tests *fail*, they do not
  skip) when the extension is missing: a broken build must not look like a green suite.
* Tolerances: flash-attention's rule for float16/bfloat16 (the op's error against the fp64
  reference may be at most 2x the error of the same reference computed in the op's own dtype,
  plus a small floor); fixed relative bounds for float32 (1e-4) and float64 (1e-10).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import socket
import sys
import tempfile
import time
import zlib
from typing import Optional

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def _load_reference():
    path = os.path.join(REPO, "python", "lasp", "reference.py")
    spec = importlib.util.spec_from_file_location("lasp_reference_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ref = _load_reference()

_LASP = None
_LASP_ERR: Optional[BaseException] = None


def import_lasp():
    """Import the lasp package (from the install, or from python/ in the source tree)."""
    global _LASP, _LASP_ERR
    if _LASP is not None:
        return _LASP
    try:
        if importlib.util.find_spec("lasp") is None:
            src = os.path.join(REPO, "python")
            if src not in sys.path:
                sys.path.append(src)
        _LASP = importlib.import_module("lasp")
        return _LASP
    except BaseException as e:  # noqa: BLE001 - re-raised with context below
        _LASP_ERR = e
        raise RuntimeError(
            "tests: cannot import the lasp package (is the extension built? "
            "`pip install -e . --no-build-isolation`): " + repr(e)
        ) from e


@pytest.fixture(scope="session")
def lasp():
    return import_lasp()


@pytest.fixture
def seed(request):
    """A different, reproducible seed for every test (and every parametrization)."""
    return zlib.crc32(request.node.nodeid.encode()) % (2**31)


# ----------------------------------------------------------------------------------------------
# Devices and dtypes

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA device"

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)),
]

DTYPE_IDS = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of states (initial_state / final_state) for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Errors and tolerances

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| when b is zero). NaN/inf in a give inf."""
    a = a.detach().to(device="cpu", dtype=torch.float64)
    b = b.detach().to(device="cpu", dtype=torch.float64)
    assert a.shape == b.shape, f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.isfinite(a).all():
        return math.inf
    num = torch.linalg.vector_norm(a - b).item()
    den = torch.linalg.vector_norm(b).item()
    return num / den if den > 0 else num


FIXED_REL_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
# Floor added to 2x the low-precision reference error: about one unit roundoff of the dtype. It
# only matters where the dtype's own reference happens to be almost exact (tiny N); any real bug
# gives O(1) relative errors.
LOWP_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def tolerance(dtype: torch.dtype, lowp_err: Optional[float]) -> float:
    if dtype in FIXED_REL_TOL:
        return FIXED_REL_TOL[dtype]
    assert lowp_err is not None, "low-precision dtypes need the error of the reference in that dtype"
    return 2.0 * lowp_err + LOWP_FLOOR[dtype]


def assert_close_to_ref(name, out, ref64, dtype, lowp=None, atol=0.0):
    """Check ``out`` (the op's result) against the fp64 reference ``ref64``.

    ``lowp``: the same quantity from the reference computed in ``dtype`` (needed for fp16/bf16).
    ``atol``: an absolute allowance on ||out - ref64|| beside the relative bound, for results whose terms
    cancel (the caller derives it from the magnitudes of the terms; 0: the relative bound alone).
    """
    assert out is not None, f"{name}: op returned None (expected a tensor)"
    assert tuple(out.shape) == tuple(ref64.shape), f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = rel_err(out, ref64)
    lowp_err = rel_err(lowp, ref64) if (lowp is not None and dtype not in FIXED_REL_TOL) else None
    tol = tolerance(dtype, lowp_err)
    extra = f", reference-in-{DTYPE_IDS.get(dtype, dtype)} err {lowp_err:.3e}" if lowp_err is not None else ""
    if atol > 0 and err > tol:
        den = torch.linalg.vector_norm(ref64.detach().double().cpu()).item()
        num = err * den if den > 0 else err
        assert num <= tol * den + atol, (
            f"{name}: error {num:.3e} > {tol:.1e} x |ref| {den:.3e} + allowance {atol:.3e}{extra}")
        return err
    assert err <= tol, f"{name}: relative error {err:.3e} > tol {tol:.3e}{extra}"
    return err


# ----------------------------------------------------------------------------------------------
# Random inputs (never zeros; fresh per test via the seed)

def gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(shape, g, dtype=torch.float32, device="cpu", scale=1.0):
    """Standard normal drawn on the CPU generator (reproducible across devices) then moved."""
    x = torch.randn(*shape, generator=g, dtype=torch.float32) * scale
    return x.to(dtype=dtype, device=device)


def alibi_slopes_expected(H: int):
    """ALiBi slopes (Press et al.), as a list of floats: the standard construction."""

    def pow2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(H).is_integer():
        return pow2(H)
    closest = 2 ** math.floor(math.log2(H))
    return pow2(closest) + alibi_slopes_expected(2 * closest)[0::2][: H - closest]


def make_decay(kind: Optional[str], H: int, device="cpu", g: Optional[torch.Generator] = None):
    """Decay rates lambda (H,) float32, or None.

    kinds: None/"none"; "alibi" (ALiBi slopes, computed here rather than by lasp.alibi_slopes so
    the op tests do not depend on it); "strong" (2.0 on every head: gamma ~ 0.135, almost no
    context); "mixed" (random in [0, 3) per head, first head exactly 0).
    """
    if kind is None or kind == "none":
        return None
    if kind == "alibi":
        d = torch.tensor(alibi_slopes_expected(H), dtype=torch.float32)
    elif kind == "strong":
        d = torch.full((H,), 2.0, dtype=torch.float32)
    elif kind == "mixed":
        d = torch.rand(H, generator=g, dtype=torch.float32) * 3.0
        d[0] = 0.0
    else:
        raise ValueError(kind)
    return d.to(device)


def make_qkv(B, H, Hkv, N, D, E, *, dtype, device, seed, layout="bhnd", requires_grad=True):
    """Random q, k, v in ``layout`` (contiguous), leaf tensors."""
    g = gen(seed)
    if layout == "bhnd":
        shapes = [(B, H, N, D), (B, Hkv, N, D), (B, Hkv, N, E)]
    else:
        shapes = [(B, N, H, D), (B, N, Hkv, D), (B, N, Hkv, E)]
    q, k, v = (randn(s, g, dtype, device) for s in shapes)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def make_state(B, H, D, E, *, dtype, device, seed, requires_grad=True):
    g = gen(seed + 7919)
    s = randn((B, H, D, E), g, acc_dtype(dtype), device)
    s.requires_grad_(requires_grad)
    return s


def poison_allocator(device, nbytes=1 << 24):
    """Fill (and free) a block of memory with NaN so that an op reading or returning
    uninitialised memory is likely to produce NaN instead of plausible values."""
    n = nbytes // 4
    x = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    del x


def grads(outputs, inputs, grad_outputs):
    """torch.autograd.grad with None for inputs that are None or do not need grad."""
    idx = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    pairs = [(o, go) for o, go in zip(outputs, grad_outputs) if o is not None and go is not None]
    res = torch.autograd.grad(
        [o for o, _ in pairs], [inputs[i] for i in idx], [go for _, go in pairs], allow_unused=True
    )
    out = [None] * len(inputs)
    for i, r in zip(idx, res):
        out[i] = r
    return out


# ----------------------------------------------------------------------------------------------
# Multi-process tests


def free_port() -> int:
    """A free TCP port on the loopback interface, for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_errors(calls):
    """{name: None, or (exception type name, message)} for each call() of `calls` (a rank's misuse cases, for
    the parent process to compare across ranks)."""
    errs = {}
    for name, call in calls.items():
        try:
            call()
            errs[name] = None
        except Exception as e:  # noqa: BLE001 - recorded for the parent's checks
            errs[name] = (type(e).__name__, str(e))
    return errs


def _run_and_exit(rank, worker, *args):
    """A spawned child: worker(rank, *args), then a hard exit once it has returned (its results are saved and
    it has left the group): the interpreter's teardown of c10d's threads has, rarely, aborted the process
    ("terminate called without an active exception") after the work was complete. Exceptions propagate as
    usual (mp.spawn reports them with their traceback)."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_world(worker, world, extra_args, deadline_s, what):
    """Runs worker(rank, world, port, *extra_args, out_dir) in `world` spawned processes, each of which
    torch.save()s its results to out_dir/rank{rank}.pt; returns those results in rank order.

    A child's exception is re-raised here with its traceback; past `deadline_s` the children are
    terminated and a TimeoutError names `what`."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(_run_and_exit, args=(worker, world, free_port(), *extra_args, out_dir), nprocs=world,
                       join=False)
        deadline = time.monotonic() + deadline_s
        while not ctx.join(timeout=1.0):  # raises ProcessRaisedException with the child's traceback
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                for p in ctx.processes:
                    p.join(5)
                raise TimeoutError(f"{what} hung for {deadline_s}s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


_SPAWNED = {}


def spawn_once(worker, world, deadline_s, what, extra_args=()):
    """spawn_world(worker, world, extra_args, deadline_s, what) once per test session (per `what`): later calls
    return the same results, and a failure is re-raised by every later call (chained to the first error)."""
    if what in _SPAWNED:
        got = _SPAWNED[what]
        if isinstance(got, BaseException):
            raise RuntimeError(f"the spawn of the {what} failed earlier") from got
        return got
    try:
        ranks = spawn_world(worker, world, extra_args, deadline_s, what)
    except BaseException as e:
        _SPAWNED[what] = e
        raise
    _SPAWNED[what] = ranks
    return ranks


def count_calls(monkeypatch, module, name):
    """Wraps module.<name> (for the test) to record the ``group`` keyword of each call; returns that list, which
    proves the wrapped path ran."""
    calls = []
    real = getattr(module, name)

    def counted(*a, **k):
        calls.append(k.get("group"))
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls
