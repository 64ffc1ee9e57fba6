"""Graph algorithms on a heavy-atom bond list (E, 2): neighbours, topological distances, smallest rings."""

from __future__ import annotations

from collections import deque

import numpy as np


def neighbour_lists(bonds: np.ndarray, n: int) -> list[list[int]]:
    """Sorted heavy-atom neighbours of each of the ``n`` atoms; bonds (E, 2)."""
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for i, j in bonds.tolist():
        nbrs[i].append(j)
        nbrs[j].append(i)
    return [sorted(x) for x in nbrs]


def topological_distances(bonds: np.ndarray, n: int) -> np.ndarray:
    """(N, N) number of bonds on the shortest path; -1 between disconnected atoms (BFS per atom)."""
    nbrs = neighbour_lists(bonds, n)
    dist = np.full((n, n), -1, dtype=np.int64)
    for s in range(n):
        row = dist[s]
        row[s] = 0
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for v in nbrs[u]:
                if row[v] < 0:
                    row[v] = row[u] + 1
                    queue.append(v)
    return dist


def smallest_rings(bonds: np.ndarray, n: int) -> list[tuple[int, ...]]:
    """For every bond on a cycle, the atoms of the smallest cycle through it (duplicates removed).

    The shortest path between the bond's ends with the bond removed closes that cycle; a bridge has none.
    """
    nbrs = neighbour_lists(bonds, n)
    rings = set()
    for a, b in bonds.tolist():
        prev = {a: -1}
        queue = deque([a])
        while queue and b not in prev:
            u = queue.popleft()
            for v in nbrs[u]:
                if v not in prev and not (u == a and v == b):
                    prev[v] = u
                    queue.append(v)
        if b in prev:
            path, u = [], b
            while u != -1:
                path.append(u)
                u = prev[u]
            rings.add(tuple(sorted(path)))
    return sorted(rings)
