"""Continual-learning metrics on an accuracy matrix (pure functions, no torch).

``R[i][j]`` is the test accuracy on task ``j`` measured right after task ``i`` was learned, for
``j <= i`` (entries above the diagonal are ignored and may be ``None``). Accuracies are fractions.

- average accuracy: the mean of the last row, the accuracy on every task at the end;
- forgetting (Chaudhry et al. 2018): for every task but the last, the drop from its best earlier
  accuracy to its final one, averaged; 0 means nothing was forgotten;
- backward transfer (Lopez-Paz & Ranzato 2017): the mean of final minus just-learned accuracy
  over every task but the last; negative values are forgetting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from recast.errors import ConfigError

Matrix = Sequence[Sequence[float | None]]


def check_matrix(matrix: Matrix) -> int:
    """Validate a lower-triangular accuracy matrix and return its number of tasks."""
    tasks = len(matrix)
    if tasks == 0:
        raise ConfigError("the accuracy matrix is empty: learn at least one task")
    for i, row in enumerate(matrix):
        if len(row) < i + 1:
            raise ConfigError(f"row {i} of the accuracy matrix has {len(row)} entries, needs at least {i + 1}")
        for j in range(i + 1):
            value = row[j]
            if value is None or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"accuracy R[{i}][{j}] = {value!r} is not a fraction in [0, 1]")
    return tasks


def average_accuracy(matrix: Matrix) -> float:
    """Mean accuracy over all tasks after the last one was learned."""
    tasks = check_matrix(matrix)
    return sum(float(matrix[-1][j]) for j in range(tasks)) / tasks


def forgetting(matrix: Matrix) -> float:
    """Average drop from each earlier task's best accuracy to its final accuracy (0 for one task)."""
    tasks = check_matrix(matrix)
    if tasks == 1:
        return 0.0
    drops = [
        max(float(matrix[i][j]) for i in range(j, tasks - 1)) - float(matrix[-1][j])
        for j in range(tasks - 1)
    ]
    return sum(drops) / len(drops)


def backward_transfer(matrix: Matrix) -> float:
    """Mean of (final accuracy - accuracy just after learning) over every task but the last."""
    tasks = check_matrix(matrix)
    if tasks == 1:
        return 0.0
    return sum(float(matrix[-1][j]) - float(matrix[j][j]) for j in range(tasks - 1)) / (tasks - 1)


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value) of a list of numbers."""
    if not values:
        raise ConfigError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return {"mean": mean, "std": 0.0}
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return {"mean": mean, "std": math.sqrt(var)}
