"""The cost model of sequence parallelism behind ``strategy="auto"``.

It predicts one lasp_attention layer's forward+backward on a group of W ranks, per way of passing the
states, from the group's size and node layout:

  ring       the chain of LASP: rank r waits for r hops, so the last rank's incoming state arrives after
             W - 1 hops, once forward and once backward;
  allgather  LASP-2: every rank gathers all W local states (NCCL's ring all-gather moves W - 1 states
             through each link) and combines them itself;
  scan       a recursive-doubling prefix scan of the pieces' maps S -> gamma^n S + L (strategy "scan"):
             on one node ceil(log2 W) rounds, each one state sent and one combine, once forward and once
             backward; over nodes of consecutive ranks ceil(log2 ranks per node) rounds within nodes, then
             ceil(log2 nodes) across them, then one more within (the state entering each node);
  pipelined  the ring with each state cut into P parts (along heads) that travel one behind the other,
             the main pass of a part starting when it arrives (the All-Scan idea of arXiv 2507.01004;
             modelled only): the first part reaches the last rank after W - 1 hops of a part, and each
             later part adds what the compute of one part does not hide; P in 1..64 at its best.

Per call, T(W) = T1(n) + O + E(W): T1 the one-device time at n tokens per rank, O the fixed cost of the
split (the local passes, the exchange's set-up), E(W) the exposed exchange. Within a node a hop costs
h_intra (h_peer over peer memory); across nodes h_net = alpha_net + state_bytes / bw_net, and no less
than h_intra. The ring crosses the network once per pair of consecutive group ranks on different nodes;
the all-gather, once the group spans nodes, is paced by its network steps; a hierarchical scan spends
log2(ranks per node) rounds inside nodes and log2(nodes) across them.

The constants (``CALIBRATIONS``) are those that ``calibrate`` derives from one ``benchmarks/bench_sp.py``
record (4 x NVIDIA H200 on NVLink, NCCL 2.28.9, B=1, H=16, D=E=128, bf16: 1 MiB float32 states); the peer
hop is ``benchmarks/bench_hop.py``'s median chain on the same machine. Nothing across nodes is measured:
the network figures are assumptions (``Network``), and so is the bandwidth that scales the measured
within-node costs to other state sizes (``INTRA_GBPS``). ``benchmarks/scaling_model.py`` prints the
model's predictions and checks it against the measured points it was not fitted to.

``choose`` compares strategies by O + E, the time the split adds to a forward+backward (T1 is the same for
all); ``strategy="auto"`` takes the measured ones (``AUTO``: ring, allgather), not the scan until its costs
are measured on GPUs. O varies a little with the tokens per rank; unless told, it
takes the calibration at REFERENCE_TOKENS, so that the length of a piece, which may differ from rank to
rank, never enters. :func:`lasp.distributed.choose_strategy` applies it to a process group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

__all__ = [
    "STRATEGIES",
    "IMPLEMENTED",
    "AUTO",
    "TRANSPORTS",
    "CALIBRATIONS",
    "REFERENCE_TOKENS",
    "Topology",
    "Network",
    "Choice",
    "calibrate",
    "calibration",
    "exchange_ms",
    "overhead_ms",
    "predict",
    "split_ms",
    "choose",
]

STRATEGIES = ("ring", "allgather", "scan", "pipelined")  # modelled
IMPLEMENTED = ("ring", "allgather", "scan")  # what lasp_attention and gated_delta_attention run
AUTO = ("ring", "allgather")  # what strategy="auto" chooses from: the strategies with measured costs
TRANSPORTS = ("nccl", "peer")  # how the ring's states travel: the process group's send/recv, or peer memory

NET_LATENCY_US = 15.0  # assumed: one message between nodes
NET_GBPS = 25.0  # assumed: network bandwidth per GPU (one 200 Gb/s NIC)
INTRA_GBPS = 450.0  # assumed: bandwidth of a state within a node (NVLink 4, one direction); sizes only
PEER_HOP_MS = 0.035 / 3  # bench_hop.py, 4 x H200, 2026-11-26: a chain of three peer hops took 35 us (median)
REFERENCE_TOKENS = 16384  # tokens per rank whose fixed costs choose() uses when it is not told

CALIBRATION_SOURCE = "benchmarks/results/bench_sp_h200x4_2026-11-26c.json"
_H_INTRA = 0.01893066676954428  # ms, one NCCL hop within a node (mean of the record's ring chains / 2 (W - 1))
_AG_A, _AG_B = 0.015255999751389027, 0.012839999981224537  # ms, one all-gather within a node: a + b (W - 1)
_STATE_BYTES = 1 * 16 * 128 * 128 * 4

# calibrate(record, n) of CALIBRATION_SOURCE, for its two weak-scaling sizes (fwd_bwd_ms of each method
# and world size; the fixed cost O of a method comes from its smallest W).
CALIBRATIONS: Dict[int, dict] = {
    16384: dict(t1=0.7723199725151062, h_intra=_H_INTRA, h_peer=PEER_HOP_MS, ag_a=_AG_A, ag_b=_AG_B,
                state_bytes=_STATE_BYTES, n_local=16384, measured={
                    "ring": {2: 0.8379520177841187, 4: 0.9466239809989929},
                    "allgather": {2: 0.8839679956436157, 4: 0.9667840003967285},
                    "ring-peer": {2: 0.8228480219841003, 4: 0.8499839901924133}}),
    65536: dict(t1=2.8107199668884277, h_intra=_H_INTRA, h_peer=PEER_HOP_MS, ag_a=_AG_A, ag_b=_AG_B,
                state_bytes=_STATE_BYTES, n_local=65536, measured={
                    "ring": {2: 2.885472059249878, 4: 3.055295944213867},
                    "allgather": {2: 2.939487934112549, 4: 3.0277440547943115},
                    "ring-peer": {2: 2.8783679008483887, 4: 2.899456024169922}}),
}
_MEASURED_METHODS = ("ring", "allgather", "ring-peer")


@dataclass(frozen=True)
class Topology:
    """Where a group's ranks are.

    world: the group's size; nodes: how many hosts it spans; crossings: how many pairs of consecutive group
    ranks (r, r + 1) are on different hosts (the ring's hops over the network); per_node: the most group
    ranks on one host.
    """

    world: int
    nodes: int = 1
    crossings: int = 0
    per_node: int = 1

    def __post_init__(self):
        if self.world < 1 or not 1 <= self.nodes <= self.world or not 0 <= self.crossings < self.world:
            raise ValueError(f"lasp.scaling.Topology: inconsistent layout {self}")
        if not 1 <= self.per_node <= self.world or self.per_node * self.nodes < self.world:
            raise ValueError(f"lasp.scaling.Topology: inconsistent layout {self}")

    @classmethod
    def filled(cls, world: int, ranks_per_node: int) -> "Topology":
        """Group ranks filling nodes of ``ranks_per_node`` in order (as torchrun numbers them)."""
        if world < 1 or ranks_per_node < 1:
            raise ValueError(f"lasp.scaling.Topology.filled: world and ranks_per_node must be >= 1, got "
                             f"{world}, {ranks_per_node}")
        nodes = math.ceil(world / ranks_per_node)
        return cls(world, nodes, nodes - 1, min(world, ranks_per_node))

    @classmethod
    def from_hosts(cls, hosts: Sequence) -> "Topology":
        """From the host of each group rank, in group rank order (any hashable labels)."""
        hosts = list(hosts)
        if not hosts:
            raise ValueError("lasp.scaling.Topology.from_hosts: no ranks")
        counts: Dict = {}
        for h in hosts:
            counts[h] = counts.get(h, 0) + 1
        crossings = sum(a != b for a, b in zip(hosts, hosts[1:]))
        return cls(len(hosts), len(counts), crossings, max(counts.values()))


@dataclass(frozen=True)
class Network:
    """Assumed cost of one message of ``nbytes`` between nodes: latency_us + nbytes / GBps."""

    latency_us: float = NET_LATENCY_US
    GBps: float = NET_GBPS

    def hop_ms(self, nbytes: int) -> float:
        return self.latency_us * 1e-3 + nbytes / (self.GBps * 1e9) * 1e3


def calibrate(record: Mapping, n_local: int, peer_hop_ms: float = PEER_HOP_MS) -> dict:
    """Model parameters from one bench_sp.py record (its parsed JSON) at n_local tokens per rank.

    t1: the record's one-device forward+backward; h_intra: the mean of its "state exchange alone" ring
    chains per hop (ring_ms / (2 (W - 1))); ag_a, ag_b: a + b (W - 1) least-squares through its two
    all-gathers alone (allgather_ms / 2); measured: fwd_bwd_ms per method and W (for the fixed costs);
    h_peer: the peer hop (not in the record).
    """
    info = record["info"]
    state_bytes = info["B"] * info["H"] * info["D"] * info["D"] * 4  # fp32 (B, H, D, E) state, D = E there
    weak = [r for r in record["rows"] if r["scaling"] == "weak" and r["n_local"] == n_local]
    single = [r for r in weak if r["method"] == "single"]
    if not single:
        raise ValueError(f"lasp.scaling.calibrate: no W = 1 row at n_local = {n_local} in the record")
    floors = record.get("comm_floor", [])
    if not floors:
        raise ValueError("lasp.scaling.calibrate: the record has no 'comm_floor' (state exchange alone) rows")
    hops = [f["ring_ms"] / (2 * (f["W"] - 1)) for f in floors]
    xs = [f["W"] - 1 for f in floors]
    ys = [f["allgather_ms"] / 2 for f in floors]
    if len(xs) >= 2:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-12, sum((x - mx) ** 2 for x in xs))
        a = my - b * mx
    else:
        a, b = 0.0, ys[0] / xs[0]
    measured: Dict[str, Dict[int, float]] = {}
    for r in weak:
        if r["method"] in _MEASURED_METHODS:
            measured.setdefault(r["method"], {})[r["W"]] = r["fwd_bwd_ms"]
    return dict(t1=single[0]["fwd_bwd_ms"], h_intra=sum(hops) / len(hops), h_peer=peer_hop_ms, ag_a=max(a, 0.0),
                ag_b=max(b, 0.0), state_bytes=state_bytes, n_local=n_local, measured=measured)


def calibration(tokens_per_rank: Optional[int] = None) -> dict:
    """The calibrated parameters nearest (in log2) to tokens_per_rank (None: REFERENCE_TOKENS)."""
    n = REFERENCE_TOKENS if tokens_per_rank is None else max(1, int(tokens_per_rank))
    return CALIBRATIONS[min(CALIBRATIONS, key=lambda c: (abs(math.log2(c / n)), c))]


def _at_size(p: dict, key: str, nbytes: int) -> float:
    """A per-state cost measured within a node at p's state size, at a state of nbytes."""
    return max(0.0, p[key] + (nbytes - p["state_bytes"]) / (INTRA_GBPS * 1e9) * 1e3)


def _check(strategy: str, transport: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"lasp.scaling: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"lasp.scaling: transport must be one of {TRANSPORTS}, got {transport!r}")


def exchange_ms(strategy: str, topo: Topology, p: dict, net: Network = Network(), *, transport: str = "nccl",
                nbytes: Optional[int] = None) -> float:
    """E: the exposed exchange of one forward+backward (both directions) on topo, with states of nbytes
    (None: the calibrated size). transport applies to the ring: "peer" needs one node."""
    _check(strategy, transport)
    W = topo.world
    if W <= 1:
        return 0.0
    nbytes = p["state_bytes"] if nbytes is None else nbytes
    h_intra = _at_size(p, "h_intra", nbytes)
    h_net = max(net.hop_ms(nbytes), h_intra)  # a message between nodes costs no less than one within a node

    def chain(hi, hn):  # the ring's W - 1 hops, those between nodes at hn
        return (W - 1 - topo.crossings) * hi + topo.crossings * hn

    if strategy == "ring":
        if transport == "peer":
            if topo.nodes > 1:
                raise ValueError("lasp.scaling.exchange_ms: the peer transport needs every rank on one node")
            return 2 * (W - 1) * _at_size(p, "h_peer", nbytes)
        return 2 * chain(h_intra, h_net)
    if strategy == "allgather":
        if topo.nodes == 1:
            return 2 * (p["ag_a"] + _at_size(p, "ag_b", nbytes) * (W - 1))
        # NCCL's ring all-gather: W - 1 steps of one state each, paced by the slowest (network) link
        return 2 * (p["ag_a"] + (W - 1) * h_net)
    if strategy == "scan":
        if topo.nodes == 1:
            return 2 * math.ceil(math.log2(W)) * h_intra
        inner = math.ceil(math.log2(topo.per_node)) + (topo.per_node > 1)  # the rounds, then the entering state
        return 2 * (inner * h_intra + math.ceil(math.log2(topo.nodes)) * h_net)
    if strategy == "pipelined":
        compute = p["t1"] / 2  # one direction's passes, spread over the parts
        best = math.inf
        for P in (1, 2, 4, 8, 16, 32, 64):
            part = nbytes / P
            hi = _at_size(p, "h_intra", part)
            hn = max(net.hop_ms(part), hi)
            slowest = hn if topo.crossings else hi
            best = min(best, chain(hi, hn) + (P - 1) * max(0.0, slowest - compute / P))
        return 2 * best
    raise AssertionError(strategy)  # _check admits only the strategies above


def overhead_ms(strategy: str, p: dict, *, transport: str = "nccl") -> float:
    """O: the fixed cost of the split, from the method's smallest measured W > 1 (measured - T1 - E there,
    on the calibration's own node); the scan and the pipelined ring, unmeasured, take the ring's."""
    _check(strategy, transport)
    base = "ring" if strategy in ("scan", "pipelined") else strategy
    key = "ring-peer" if base == "ring" and transport == "peer" else base
    pts = p["measured"].get(key, {})
    if not pts:
        return 0.0
    w0 = min(pts)
    return pts[w0] - p["t1"] - exchange_ms(base, Topology.filled(w0, w0), p, transport=transport)


def predict(strategy: str, topo: Topology, p: dict, net: Network = Network(), *, transport: str = "nccl",
            nbytes: Optional[int] = None) -> float:
    """T(W) = T1 + O + E(W), in ms, for the calibrated shape at p's tokens per rank."""
    return (p["t1"] + (overhead_ms(strategy, p, transport=transport) if topo.world > 1 else 0.0)
            + exchange_ms(strategy, topo, p, net, transport=transport, nbytes=nbytes))


def split_ms(strategy: str, topo: Topology, p: dict, net: Network = Network(), *, transport: str = "nccl",
             nbytes: Optional[int] = None) -> float:
    """O + E(W): what the split adds to the one-device time of a piece (0 on one rank)."""
    if topo.world <= 1:
        return 0.0
    return (overhead_ms(strategy, p, transport=transport)
            + exchange_ms(strategy, topo, p, net, transport=transport, nbytes=nbytes))


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` picked and why.

    strategy: the pick; split_ms: per candidate, the predicted time (ms) its exchange adds to one
    forward+backward; topology, transport (of the ring), state_bytes, gather_bytes (what each rank adds to
    the all-gather) and tokens_per_rank (whose calibrated fixed costs were used): the inputs.
    """

    strategy: str
    split_ms: Dict[str, float]
    topology: Topology
    transport: str
    state_bytes: int
    gather_bytes: int
    tokens_per_rank: int

    def __str__(self) -> str:
        t = self.topology
        costs = ", ".join(f"{s} {ms:.3f} ms" for s, ms in self.split_ms.items())
        return (f"{self.strategy} (W={t.world} on {t.nodes} node{'s' if t.nodes > 1 else ''}, "
                f"{t.crossings} network hop{'s' if t.crossings != 1 else ''} in the ring, ring over {self.transport}, "
                f"{self.state_bytes / 2**20:.2f} MiB states; predicted cost of the split: {costs})")


def choose(topo: Topology, state_bytes: int, *, transport: str = "nccl", gather_bytes: Optional[int] = None,
           candidates: Sequence[str] = AUTO, tokens_per_rank: Optional[int] = None,
           net: Network = Network()) -> Choice:
    """The candidate with the smallest predicted O + E(W) (ties: the earlier candidate, so "ring").

    Only the layout and sizes enter, never a piece's length: every rank of a group that passes the same
    arguments gets the same answer. state_bytes: one (B, H, D, E) state; gather_bytes: what each rank
    contributes to the all-gather (None: state_bytes); transport: how the ring's states would travel.
    """
    cands: Tuple[str, ...] = tuple(candidates)
    if not cands or any(s not in IMPLEMENTED for s in cands):
        raise ValueError(f"lasp.scaling.choose: candidates must be some of {IMPLEMENTED}, got {cands!r}")
    p = calibration(tokens_per_rank)
    gather = state_bytes if gather_bytes is None else gather_bytes
    costs = {s: split_ms(s, topo, p, net, transport=transport if s == "ring" else "nccl",
                         nbytes=gather if s == "allgather" else state_bytes) for s in cands}
    best = min(cands, key=lambda s: (costs[s], cands.index(s)))
    return Choice(best, costs, topo, transport, int(state_bytes), int(gather), p["n_local"])
