"""Gossip graphs and their mixing weights.

A graph is an adjacency dict: name -> set of neighbour names (undirected, no self loops).
Every node builds the same graph from the same topology file, so construction is
deterministic: `random_regular` draws from a seeded `random.Random` using only `random()`,
whose sequence Python guarantees across versions (numpy's streams may change).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Mapping, Sequence

Adjacency = dict[str, set[str]]


def _unique(names: Iterable[str]) -> list[str]:
    names = list(names)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"peer {name!r} is listed twice")
        seen.add(name)
    return names


def complete(names: Iterable[str]) -> Adjacency:
    """Every node neighbours every other (gossip on it is FedAvg without a server)."""
    names = _unique(names)
    return {name: set(names) - {name} for name in names}


def ring_neighbours(names: Sequence[str]) -> Adjacency:
    """Each node neighbours the nodes before and after it in the listed order (a cycle)."""
    names = _unique(names)
    adj: Adjacency = {name: set() for name in names}
    if len(names) > 1:
        for i, name in enumerate(names):
            nxt = names[(i + 1) % len(names)]
            if nxt != name:
                adj[name].add(nxt)
                adj[nxt].add(name)
    return adj


def _shuffle(items: list, rng: random.Random) -> None:
    # Fisher-Yates on rng.random() alone: reproducible on every Python version.
    for i in range(len(items) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        items[i], items[j] = items[j], items[i]


def _try_regular(n: int, k: int, rng: random.Random) -> set[frozenset[int]] | None:
    """One attempt of the pairing construction with local restarts (Steger-Wormald style)."""
    edges: set[frozenset[int]] = set()
    stubs = [node for node in range(n) for _ in range(k)]
    while stubs:
        _shuffle(stubs, rng)
        leftover: list[int] = []
        for u, v in zip(stubs[::2], stubs[1::2]):
            edge = frozenset((u, v))
            if u != v and edge not in edges:
                edges.add(edge)
            else:
                leftover += [u, v]
        if leftover:
            # Give up if no two distinct leftover nodes can still be joined.
            pending = sorted(set(leftover))
            if not any(frozenset((u, v)) not in edges
                       for i, u in enumerate(pending) for v in pending[i + 1:]):
                return None
        stubs = leftover
    return edges


def random_regular(names: Iterable[str], k: int, seed: int) -> Adjacency:
    """A random k-regular graph, the same for the same (sorted names, k, seed).

    Args:
        names: the peers (their order does not matter: they are sorted first).
        k: degree of every node, 0 <= k < len(names), len(names) * k even.
        seed: integer seed from the topology.

    Returns:
        adjacency in which every node has exactly k neighbours.
    """
    names = tuple(sorted(_unique(names)))
    n = len(names)
    if not 0 <= k < n:
        raise ValueError(f"a {k}-regular graph needs 0 <= k < number of peers ({n})")
    return {name: set(neighbours) for name, neighbours in _drawn_regular(names, k, seed).items()}


@functools.lru_cache(maxsize=8)
def _drawn_regular(names: tuple[str, ...], k: int, seed: int) -> dict[str, frozenset[str]]:
    # Drawn once per process and setting: every site of an in-process study draws the same
    # graph, 2.4 ms a site at 1,000 sites (a copy: 0.3 ms). Frozen: callers get their own sets.
    n = len(names)
    if n * k % 2:
        raise ValueError(f"no {k}-regular graph on {n} peers exists: peers * k = {n * k} is odd")
    # Dense graphs are built as the complement of a sparse one: pairing succeeds quickly
    # for small degrees only.
    dense = k > (n - 1) // 2
    degree = n - 1 - k if dense else k
    rng = random.Random(seed)
    for _ in range(10_000):
        edges = _try_regular(n, degree, rng)
        if edges is not None:
            break
    else:
        raise RuntimeError(f"could not draw a {k}-regular graph on {n} peers with seed {seed}")
    adj: Adjacency = {name: set() for name in names}
    for edge in edges:
        u, v = tuple(edge)
        adj[names[u]].add(names[v])
        adj[names[v]].add(names[u])
    if dense:
        adj = {name: set(names) - {name} - adj[name] for name in names}
    return {name: frozenset(neighbours) for name, neighbours in adj.items()}


def edge_list(names: Iterable[str], edges: Iterable[tuple[str, str]]) -> Adjacency:
    """A graph from explicit undirected edges.

    Raises:
        ValueError: naming an edge's unknown peer or a self loop.
    """
    names = _unique(names)
    adj: Adjacency = {name: set() for name in names}
    for edge in edges:
        if len(edge) != 2:
            raise ValueError(f"an edge joins two peers, got {edge!r}")
        u, v = edge
        for end in (u, v):
            if end not in adj:
                raise ValueError(f"edge {u!r} - {v!r} names unknown peer {end!r}")
        if u == v:
            raise ValueError(f"edge {u!r} - {v!r} is a self loop")
        adj[u].add(v)
        adj[v].add(u)
    return adj


def is_connected(adj: Mapping[str, set[str]]) -> bool:
    """Whether every node reaches every other (gossip only converges on connected graphs)."""
    if not adj:
        return True
    start = next(iter(adj))
    seen = {start}
    frontier = [start]
    while frontier:
        node = frontier.pop()
        for nbr in adj[node]:
            if nbr not in seen:
                seen.add(nbr)
                frontier.append(nbr)
    return len(seen) == len(adj)


def _check_undirected(adj: Mapping[str, set[str]]) -> None:
    for node, nbrs in adj.items():
        if node in nbrs:
            raise ValueError(f"peer {node!r} lists itself as a neighbour")
        for nbr in nbrs:
            if nbr not in adj or node not in adj[nbr]:
                raise ValueError(f"edge {node!r} - {nbr!r} is not listed from both ends")


def metropolis_hastings_weights(adj: Mapping[str, set[str]]) -> dict[str, dict[str, float]]:
    """Metropolis-Hastings mixing weights: w_ij = 1 / (1 + max(deg i, deg j)) on edges.

    Args:
        adj: undirected adjacency.

    Returns:
        i -> {j: w_ij} over i's neighbours and i itself, w_ii = 1 - sum of the others.
        The matrix is symmetric and doubly stochastic, so gossip converges to the plain
        average of all nodes on any connected graph.

    Example:
        >>> metropolis_hastings_weights({"a": {"b"}, "b": {"a", "c"}, "c": {"b"}})["a"]
        {'b': 0.3333333333333333, 'a': 0.6666666666666667}
    """
    _check_undirected(adj)
    weights: dict[str, dict[str, float]] = {}
    for i, nbrs in adj.items():
        row = {j: 1.0 / (1 + max(len(nbrs), len(adj[j]))) for j in sorted(nbrs)}
        row[i] = 1.0 - sum(row.values())
        weights[i] = row
    return weights


def sample_count_weights(adj: Mapping[str, set[str]],
                         counts: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """FedAvg weights on the complete graph: w_ij = n_j / sum of all n.

    Every node gets the same row, so after a round every node holds the same model.

    Args:
        adj: a complete graph.
        counts: node -> number of training samples (>= 0, not all zero).

    Returns:
        i -> {j: w_ij} over every node j, i included.
    """
    _check_undirected(adj)
    for node, nbrs in adj.items():
        if len(nbrs) != len(adj) - 1:
            raise ValueError("sample-count weights need the complete graph (peer "
                             f"{node!r} has {len(nbrs)} of {len(adj) - 1} neighbours); "
                             "use metropolis_hastings_weights")
    missing = sorted(set(adj) - set(counts))
    if missing:
        raise ValueError(f"no sample count for {missing}")
    if any(counts[name] < 0 for name in adj):
        raise ValueError("sample counts must be >= 0")
    total = sum(counts[name] for name in adj)
    if total <= 0:
        raise ValueError("sample counts are all zero")
    row = {j: counts[j] / total for j in sorted(adj)}
    return {i: dict(row) for i in adj}
