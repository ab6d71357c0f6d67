"""Exact assignment of basket units to product sets, for when taking them in line order fails.

Why: sets may share products (a set 'Spread' {jam, bread} and a set 'Jam' {jam}). Taking each
set's units in line order can give 'Spread' the only jam although bread would do, and a basket
that satisfies every set is then refused. Finding units for every set at once is a small
transportation problem (at most 10 sets, each needing at most 1,000 units, against the lines'
quantities), solved exactly here by augmenting paths: each set in turn takes free units, and
when none is left on its lines it moves units an earlier set holds to another line that set may
use. No library is needed for a graph of at most 10 sets and 1,000 lines.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import pairwise


def assign_units(demands: Sequence[int], candidates: Sequence[Sequence[int]],
                 supply: Sequence[int]) -> list[dict[int, int]] | None:
    """Units per line for each set, or None when the lines cannot serve every set at once.

    Set ``s`` needs ``demands[s]`` units from the lines ``candidates[s]`` (most preferred
    first); line ``i`` has ``supply[i]`` units. Sets are served in order and each takes its
    preferred lines first, so the result stays close to what taking units in order gives."""
    free = list(supply)
    held: list[dict[int, int]] = [{} for _ in demands]
    for target, demand in enumerate(demands):
        need = demand
        while need:
            path = _augmenting_path(target, candidates, held, free)
            if path is None:
                return None
            need -= _augment(path, need, held, free)
    return held


def _augmenting_path(start: int, candidates: Sequence[Sequence[int]],
                     held: Sequence[dict[int, int]], free: Sequence[int]
                     ) -> list[tuple[int, int]] | None:
    """The shortest chain ``[(set, line), ...]`` from ``start`` to a line with a free unit:
    each later set gives up a unit of the line before it and takes one of its own line."""
    came_from: dict[int, tuple[int, int]] = {}  # line -> (set that reaches it, its entry line)
    entry: dict[int, int] = {start: -1}  # set -> the line through which the search reached it
    queue = deque([start])
    while queue:
        owner = queue.popleft()
        for line in candidates[owner]:
            if line in came_from:
                continue
            came_from[line] = (owner, entry[owner])
            if free[line] > 0:
                return _path_to(line, came_from)
            for other, units in enumerate(held):
                if other not in entry and units.get(line, 0) > 0:
                    entry[other] = line
                    queue.append(other)
    return None


def _path_to(line: int, came_from: dict[int, tuple[int, int]]) -> list[tuple[int, int]]:
    path = []
    while line != -1:
        owner, previous = came_from[line]
        path.append((owner, line))
        line = previous
    path.reverse()
    return path


def _augment(path: list[tuple[int, int]], need: int, held: list[dict[int, int]],
             free: list[int]) -> int:
    """Move as many units as the path allows (at most ``need``); returns how many."""
    amount = min(need, free[path[-1][1]])
    for (_, given_up), (owner, _) in pairwise(path):
        amount = min(amount, held[owner][given_up])
    for owner, line in path:
        held[owner][line] = held[owner].get(line, 0) + amount
    for (_, line), (successor, _) in pairwise(path):  # the next set gives up this line's units
        held[successor][line] -= amount
        if not held[successor][line]:
            del held[successor][line]
    free[path[-1][1]] -= amount
    return amount
