"""An alpha-beta cost model of expert-parallel dispatch + combine, for planning at scales this
course cannot run.

A message of n bytes over a link costs alpha + n / beta seconds (Hockney's model): a latency per
message plus the bytes over the bandwidth. The model's assumptions, per forward pass:

- W ranks (GPUs), G per node (G = min(gpus_per_node, W)), N = W / G nodes. Intra-node messages
  use NVLink-class links (intra_*), inter-node messages the GPU's own network card (inter_*).
- Each rank holds `tokens` tokens and sends every token to k experts: k copies of d_model
  elements of `dtype` each (no deduplication of copies bound for the same rank, as minimoe does).
- Routing is uniform: a copy goes to any of the W ranks with probability 1/W (experts spread
  evenly over the ranks); copies for the rank's own experts stay put and cost nothing.
  `imbalance` >= 1 scales the bytes of the busiest rank, which finishes last: the max over
  ranks of the received copies divided by the mean.
- A rank sends one message per peer and phase. `concurrency` c messages on the same kind of
  link are in flight at once, so m messages pay ceil(m / c) latencies; their bytes share the
  link's bandwidth either way. c = 1 is MPI's pairwise-exchange all-to-all (Thakur, Rabenseifner
  and Gropp 2005: (p - 1) alpha + (p - 1) / p * n / beta); c = None (the default) puts all of
  them in flight, one latency per stage, as NCCL's grouped sends and receives and DeepEP's
  GPU-initiated transfers do. NVLink and the network work at the same time.
- flat: one all-to-all over all W ranks: G - 1 intra-node and W - G inter-node messages of
  copies / W each; time = max(intra, inter).
- hierarchical (two stages, as Tutel's 2D all-to-all or DeepEP's NVLink forwarding): first an
  all-to-all inside the node, where each GPU collects what its node sends to the GPUs with its
  local index on every node (G - 1 messages, (G - 1) / G of the copies), then an all-to-all
  among the N GPUs with that local index (N - 1 messages, each G times larger, (N - 1) / N of
  the copies); the stages run one after the other. Same inter-node bytes, W - G -> N - 1
  inter-node messages, more NVLink bytes.
- combine sends the results back along the same paths: it costs as much as dispatch. The
  backward pass costs the same again (not included).
- Ignored: the count exchange (E integers), local permutes, overlap with compute, congestion
  in the network core, and how much of the peak bandwidth small messages really get.
"""

import math
from dataclasses import dataclass

import torch

from minimoe import _checks


@dataclass(frozen=True)
class AllToAllCost:
    """Per rank, one forward pass (dispatch + combine).

    bytes_per_copy       d_model * element size: one token copy
    intra_bytes          bytes the rank sends over intra-node links
    inter_bytes          bytes the rank sends over the network
    intra_messages, inter_messages   messages the rank sends
    dispatch_seconds     one all-to-all (combine takes as long)
    """

    bytes_per_copy: int
    intra_bytes: float
    inter_bytes: float
    intra_messages: int
    inter_messages: int
    dispatch_seconds: float

    @property
    def bytes_sent(self) -> float:
        return self.intra_bytes + self.inter_bytes

    @property
    def seconds(self) -> float:
        """dispatch + combine."""
        return 2 * self.dispatch_seconds


def all_to_all_cost(tokens: int, d_model: int, k: int, world_size: int, *, dtype: torch.dtype = torch.bfloat16,
                    gpus_per_node: int = 8, intra_bandwidth: float = 450e9, intra_latency: float = 3e-6,
                    inter_bandwidth: float = 50e9, inter_latency: float = 10e-6, hierarchical: bool = False,
                    imbalance: float = 1.0, concurrency: int | None = None) -> AllToAllCost:
    """Cost of dispatch + combine for `tokens` tokens per rank (see the module docstring).

    Bandwidths in bytes/s per GPU and direction, latencies in seconds per message. Defaults: an
    H100 node (NVLink 4: 450 GB/s per direction; one 400 Gb/s InfiniBand NDR card per GPU:
    50 GB/s); the latencies are orders of magnitude, not measurements. `concurrency`: messages
    per kind of link in flight at once (1: one after the other; None: all).
    """
    tokens = _checks.positive_int("tokens", tokens, minimum=0)
    d_model = _checks.positive_int("d_model", d_model)
    k = _checks.positive_int("k", k)
    world = _checks.positive_int("world_size", world_size)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    per_node = min(_checks.positive_int("gpus_per_node", gpus_per_node), world)
    if world % per_node:
        raise ValueError(f"world_size must be a multiple of gpus_per_node={gpus_per_node}, got {world}")
    beta_intra = _checks.positive("intra_bandwidth", intra_bandwidth)
    beta_inter = _checks.positive("inter_bandwidth", inter_bandwidth)
    alpha_intra = _checks.non_negative("intra_latency", intra_latency)
    alpha_inter = _checks.non_negative("inter_latency", inter_latency)
    if not _checks.non_negative("imbalance", imbalance) >= 1:
        raise ValueError(f"imbalance must be >= 1 (busiest rank / mean), got {imbalance}")
    if concurrency is not None:
        concurrency = _checks.positive_int("concurrency", concurrency)
    nodes = world // per_node

    def latency(messages: int, alpha: float) -> float:  # ceil(messages / concurrency) rounds
        return alpha * (-(-messages // concurrency) if concurrency else min(messages, 1))

    bytes_per_copy = d_model * dtype.itemsize
    volume = tokens * k * bytes_per_copy * imbalance  # all of the rank's copies, its own included
    if hierarchical:
        intra_msgs, intra_bytes = per_node - 1, volume * (per_node - 1) / per_node
        inter_msgs, inter_bytes = nodes - 1, volume * (nodes - 1) / nodes
        intra = latency(intra_msgs, alpha_intra) + intra_bytes / beta_intra
        seconds = intra + latency(inter_msgs, alpha_inter) + inter_bytes / beta_inter  # stage 2 waits for stage 1
    else:
        intra_msgs, intra_bytes = per_node - 1, volume * (per_node - 1) / world
        inter_msgs, inter_bytes = world - per_node, volume * (world - per_node) / world
        intra = latency(intra_msgs, alpha_intra) + intra_bytes / beta_intra
        seconds = max(intra, latency(inter_msgs, alpha_inter) + inter_bytes / beta_inter)  # both links at once
    return AllToAllCost(bytes_per_copy, 2 * intra_bytes, 2 * inter_bytes, 2 * intra_msgs, 2 * inter_msgs, seconds)


def traffic_bytes(traffic: torch.Tensor, bytes_per_copy: int) -> torch.Tensor:
    """traffic [W, W]: token copies rank s dispatches to rank r (row s, column r) ->
    [W] bytes each rank sends to other ranks in dispatch (its row) + combine (its column, the
    results going back); the diagonal stays on its rank."""
    _checks.tensor("traffic", traffic, ndim=2)
    if traffic.shape[0] != traffic.shape[1]:
        raise ValueError(f"traffic must be square [W, W], got shape {tuple(traffic.shape)}")
    bytes_per_copy = _checks.positive_int("bytes_per_copy", bytes_per_copy)
    remote = traffic.sum(1) + traffic.sum(0) - 2 * traffic.diagonal()
    return remote * bytes_per_copy


def expected_nodes_per_token(num_experts: int, k: int, nodes: int) -> float:
    """How many distinct nodes a token's k distinct experts touch on average, experts spread
    evenly over the nodes and chosen uniformly: N (1 - C(E - E/N, k) / C(E, k)). A system that
    sends each token once per node (DeepEP, DeepSeek-V3) moves this many copies over the
    network instead of k (N - 1) / N."""
    num_experts, k, nodes = (_checks.positive_int(n, v) for n, v in (("num_experts", num_experts), ("k", k),
                                                                       ("nodes", nodes)))
    if k > num_experts or num_experts % nodes:
        raise ValueError(f"need k <= num_experts and nodes dividing num_experts, got E={num_experts}, k={k}, "
                         f"nodes={nodes}")
    return nodes * (1 - math.comb(num_experts - num_experts // nodes, k) / math.comb(num_experts, k))
