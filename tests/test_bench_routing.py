"""The routing benchmark's yardsticks (closed gap, calls saved) on small hand-made tables."""

import math

import numpy as np
import pytest
import torch

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


# ----------------------------------------------------------------------------- sweep cache, both yardsticks


def test_sweep_reads_the_cache_and_runs_only_missing_contexts(tmp_path, monkeypatch):
    import json

    names = [e.name for e in routing.yardstick_pool("analytic")]
    cache = tmp_path / "rows.jsonl"
    row = lambda q: [[q, 10 + k] for k in range(len(names))]  # noqa: E731
    lines = [json.dumps([routing.cache_key("analytic", "heldout", 0, "varied", i, 0), row(0.1 * i)]) for i in range(2)]
    cache.write_text("\n".join(lines) + "\n" + '["torn', encoding="utf-8")  # a torn last line is ignored
    ran = []

    def fake(job):
        ran.append(job)
        _, split, seed, _, cond, items = job
        return [(routing.cache_key("analytic", split, seed, cond, i, offset), row(0.9)) for i, offset in items]

    monkeypatch.setattr(routing, "_sweep_one", fake)
    table = routing.sweep("heldout", 0, 3, "varied", [(0, 0), (1, 0), (2, 0)], 1, "analytic", cache)
    assert [job[5] for job in ran] == [[(2, 0)]]  # only the context not in the cache ran
    assert table.names == tuple(names) and table.quality[:, 0].tolist() == pytest.approx([0.0, 0.1, 0.9])
    assert table.nfe[2].tolist() == [10 + k for k in range(len(names))]
    # The new row was appended: a second sweep runs nothing.
    ran.clear()
    again = routing.sweep("heldout", 0, 3, "varied", [(0, 0), (1, 0), (2, 0)], 1, "analytic", cache)
    assert ran == [] and np.array_equal(again.quality, table.quality)
    # Another yardstick, split or seed offset is another key.
    assert len({routing.cache_key("learned", "heldout", 0, "varied", 2, 0),
                routing.cache_key("analytic", "train", 0, "varied", 2, 0),
                routing.cache_key("analytic", "heldout", 0, "varied", 2, 1),
                routing.cache_key("analytic", "heldout", 0, "varied", 2, 0)}) == 4


def test_learned_contexts_are_prefix_stable_and_held_out_splits_share_no_start_image_or_seed():
    train, heldout = routing.learned_env("train", 0, 40), routing.learned_env("heldout", 0, 40)
    assert routing.learned_env("heldout", 0, 10).contexts == heldout.contexts[:10]
    assert not {c.seed for c in train.contexts} & {c.seed for c in heldout.contexts}
    assert {c.cfg for c in heldout.contexts} - {1.0} <= set(routing.LEARNED_SPLITS["heldout"]["cfgs"])
    assert not ({c.cfg for c in heldout.contexts} - {1.0}) & set(routing.LEARNED_SPLITS["train"]["cfgs"])
    model = routing._LEARNED_MODEL
    img2img = [c for c in heldout.contexts if c.denoise < 1]
    assert img2img, "30% of contexts are img2img"
    for c in img2img:  # held-out img2img starts from digits 14-19 of its class, never a training digit
        clean = heldout.source.clean_latent(c)
        assert torch.equal(clean[0], model.data_images(c.prompt)[14 + c.image])
    assert heldout.state(heldout.contexts[0], 0.5).shape == (64,)


def _fake_env(n, dim=64, seed=0):
    class Env:
        contexts = list(range(n))

        def state(self, context, priority):
            g = torch.Generator().manual_seed(1000 * seed + int(context))
            s = torch.randn(dim, generator=g) * 0.3
            s[59] = 2 * priority - 1
            return s

    return Env()


def test_sweep_rows_are_full_information_rows_one_context_on_one_side():
    from moe_sampler.router import online

    table = two_expert_table()
    rows = routing.sweep_rows(_fake_env(4), table, 3, seed=0)
    assert len(rows) == 6 and {r.quality_source for r in rows} == {"sweep"} and {r.propensity for r in rows} == {1.0}
    assert [r.expert for r in rows] == ["cheap", "dear"] * 3
    assert rows[4].quality == pytest.approx(0.2) and rows[5].quality == pytest.approx(0.9)
    assert rows[0].cost == pytest.approx(math.log2(10) / 10) and rows[1].cost == pytest.approx(math.log2(40) / 10)
    for a, b in zip(rows[::2], rows[1::2]):  # a context's rows: same state, priority, held-out side
        assert a.state == b.state and a.priority == b.priority and online.is_heldout(a) == online.is_heldout(b)


def test_report_policies_scores_the_oracle_one_and_the_best_fixed_expert_zero(capsys):
    table = two_expert_table()
    oracle = lambda p: table.utility(p).argmax(1)  # noqa: E731
    sbs = lambda p: np.full(4, int(table.utility(p).mean(0).argmax()))  # noqa: E731
    out = routing.report_policies("toy", table, None, {"oracle": oracle, "sbs": sbs}, seed=0)
    for p in routing.PRIORITIES:
        if not math.isnan(out["oracle"][p][0]):
            assert out["oracle"][p][0] == pytest.approx(1.0) and out["sbs"][p][0] == pytest.approx(0.0)
    assert not math.isnan(out["oracle"][1.0][0])  # at p = 1 'cheap' loses on two contexts: a gap
    text = capsys.readouterr().out
    assert "oracle" in text and "dear" in text
    # A subset of rows: the first two contexts, where 'cheap' is the oracle everywhere (no gap).
    sub = routing.report_policies("toy", table, None, {"oracle": oracle}, seed=0, rows=[0, 1])
    assert all(math.isnan(sub["oracle"][p][0]) for p in routing.PRIORITIES)


def test_guarded_policy_follows_the_expert_that_the_sweep_rows_show_best():
    from moe_sampler.experts import default_pool

    pool = default_pool()
    names = tuple(e.name for e in pool)
    n = 60
    quality = np.full((n, len(pool)), 0.2)
    best = names.index("EarlyStopper")
    quality[:, best] = 0.95  # far ahead of every other expert on every context, at every priority
    nfe = np.full((n, len(pool)), 20)
    table = routing.Table(names, quality, nfe)
    heldout = _fake_env(12, seed=1)
    choose, result = routing.guarded_policy(_fake_env(n), table, n, pool, seed=0, model="toy", heldout_env=heldout)
    assert result.adopted, result.summary()
    for p in (0.0, 0.5, 1.0):
        assert set(choose(p).tolist()) == {best}, p
    # With no rows the untrained router's prior is all it has: one fixed expert per priority.
    choose0, result0 = routing.guarded_policy(_fake_env(n), table, 0, pool, seed=0, model="toy", heldout_env=heldout)
    assert not result0.adopted
    assert len(set(choose0(0.5).tolist())) == 1


# ----------------------------------------------------------------------------- the untrained router's prior


def _three_expert_tables():
    """Two yardsticks over SpeedDemon / BalancedMaster / QualityMaster: on 'a' the many-call expert
    is worth its calls from a lower priority than on 'b'."""
    names = ("SpeedDemon", "BalancedMaster", "QualityMaster")
    nfe = np.array([[10, 20, 41]] * 2)
    a = routing.Table(names, np.array([[0.55, 0.75, 0.95]] * 2), nfe)
    b = routing.Table(names, np.array([[0.60, 0.76, 0.90]] * 2), nfe)
    return names, {"a": a, "b": b}


def test_minimax_regret_is_the_worst_regret_over_the_yardsticks():
    names, tables = _three_expert_tables()
    grid = (0.0, 0.5, 1.0)
    regret = routing.minimax_regrets(tables, grid)
    assert regret.shape == (3, 3) and (regret >= 0).all()
    for i, p in enumerate(grid):
        per = [t.utility(p)[0].max() - t.utility(p)[0] for t in tables.values()]
        assert regret[i] == pytest.approx(np.maximum(*per))
    assert names[int(regret[0].argmin())] == "SpeedDemon" and names[int(regret[2].argmin())] == "QualityMaster"


def test_fit_prior_reaches_the_minimax_picks_and_the_shipped_prior_is_near_them():
    from moe_sampler.experts import get_expert
    from moe_sampler.router.model import PRIOR_INIT

    names, tables = _three_expert_tables()
    pool = [get_expert(n) for n in names]
    grid = tuple(round(0.02 * i, 2) for i in range(51))
    theta, info = routing.fit_prior(tables, pool, grid=grid)
    assert info["regret_mean"] <= info["bound_mean"] + 1e-4 + 1e-9
    assert info["regret_mean"] <= routing.prior_regrets(PRIOR_INIT, tables, pool, grid).mean() + 1e-9
    assert theta[4] == PRIOR_INIT[4]  # the stochastic penalty is not fitted
    points = routing.switch_points(theta, pool, grid)
    assert points[0] == (0.0, "SpeedDemon") and points[-1][1] == "QualityMaster"
    q, c = routing.prior_outcomes(theta, pool)
    assert q.shape == c.shape == (3,) and (np.diff(q) > 0).all() and (np.diff(c) > 0).all()
