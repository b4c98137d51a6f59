"""Continual-learning metrics on hand-made accuracy matrices."""

import math

import pytest

from recast.errors import ConfigError
from recast.metrics import average_accuracy, backward_transfer, forgetting, mean_std

# R[i][j]: accuracy on task j after learning task i
MATRIX = [
    [0.9, None, None],
    [0.7, 0.8, None],
    [0.6, 0.85, 0.5],
]


def test_average_accuracy_is_the_mean_of_the_last_row():
    assert average_accuracy(MATRIX) == pytest.approx((0.6 + 0.85 + 0.5) / 3)


def test_forgetting_uses_the_best_earlier_accuracy():
    # task 0: best 0.9, final 0.6 -> 0.3; task 1: best 0.8, final 0.85 -> -0.05
    assert forgetting(MATRIX) == pytest.approx((0.3 - 0.05) / 2)


def test_backward_transfer_compares_with_just_learned():
    assert backward_transfer(MATRIX) == pytest.approx(((0.6 - 0.9) + (0.85 - 0.8)) / 2)


def test_no_forgetting_gives_exact_zeros():
    matrix = [[0.5, None], [0.5, 0.75]]
    assert forgetting(matrix) == 0.0
    assert backward_transfer(matrix) == 0.0
    assert average_accuracy(matrix) == 0.625


def test_one_task():
    assert forgetting([[0.4]]) == 0.0 and backward_transfer([[0.4]]) == 0.0 and average_accuracy([[0.4]]) == 0.4


@pytest.mark.parametrize("matrix", [[], [[1.5]], [[0.5], [0.5]], [[None]], [[math.nan]]])
def test_bad_matrices_are_refused(matrix):
    with pytest.raises(ConfigError):
        average_accuracy(matrix)


def test_mean_std():
    assert mean_std([1.0]) == {"mean": 1.0, "std": 0.0}
    result = mean_std([1.0, 2.0, 3.0])
    assert result["mean"] == 2.0 and result["std"] == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        mean_std([])
