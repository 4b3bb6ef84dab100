"""The routing benchmark's yardsticks (closed gap, calls saved) on small hand-made tables."""

import math

import numpy as np
import pytest

from helpers import import_bench

routing = import_bench("routing")
Table = routing.Table


def two_expert_table() -> "Table":
    # "cheap" is perfect on the first two contexts and poor on the last two; "dear" is always good.
    quality = np.array([[1.0, 1.0], [1.0, 1.0], [0.2, 0.9], [0.2, 0.9]])
    nfe = np.array([[10, 40]] * 4)
    return Table(("cheap", "dear"), quality, nfe)


def test_closed_gap_is_one_for_the_oracle_and_zero_for_the_single_best():
    table = two_expert_table()
    u = table.utility(0.5)
    oracle, sbs = u.argmax(1), np.full(len(u), int(u.mean(0).argmax()))
    assert routing.closed_gap(u, oracle) == pytest.approx(1.0)
    assert routing.closed_gap(u, sbs) == pytest.approx(0.0)
    worse = 1 - oracle  # the wrong expert everywhere
    assert routing.closed_gap(u, worse) < 0


def test_closed_gap_is_undefined_without_a_gap():
    u = np.array([[0.5, 0.1], [0.5, 0.1]])
    assert math.isnan(routing.closed_gap(u, np.array([1, 1])))


def test_calls_saved_at_equal_mean_quality():
    table = two_expert_table()
    # The per-context oracle at the top priority: cheap where it is perfect, dear elsewhere.
    curve = routing.operating_curve(table, lambda p: table.utility(p).argmax(1))
    dear_q, dear_nfe = table.quality[:, 1].mean(), 40.0
    # Mean quality 0.95 >= dear's 0.95 at mean NFE (10 + 10 + 40 + 40) / 4 = 25: 37.5% saved.
    assert routing.saving(curve, dear_q, dear_nfe) == pytest.approx(1 - 25 / 40)
    # A quality no point on the curve reaches.
    assert math.isnan(routing.saving(curve, 1.0, dear_nfe))


def test_table_environment_draws_only_its_rows_and_counts_distinct_runs():
    import random

    table = two_expert_table()
    env = routing.TableEnvironment(env=None, table=table, rows=2)
    rng = random.Random(0)
    assert {env.sample_context(rng) for _ in range(50)} == {0, 1}

    class Named:
        def __init__(self, name):
            self.name = name

    experts = [Named("cheap"), Named("dear")]
    first = env.evaluate(1, experts)
    env.evaluate(1, experts)  # drawn again: the same runs
    assert len(env.runs) == 2
    assert [o.quality for o in first] == [1.0, 1.0] and [o.nfe for o in first] == [10, 40]
