"""The load-balancing lab: deterministic, and the methods order as the lesson says."""

import pytest
import torch

from glm4moe_lib import max_violation
from glm4moe_lib.lab import METHODS, LabResult, make_lab_moe, make_task, run_balancing_experiment, run_sweep

STEPS = 120


@pytest.fixture(scope="module")
def results() -> dict[str, LabResult]:
    return {
        m: run_balancing_experiment(m, coef, steps=STEPS, seed=0)
        for m, coef in [("none", None), ("aux", 1e-2), ("bias", 1e-2), ("zloss", 1e-2)]
    }


def test_deterministic(results):
    again = run_balancing_experiment("aux", 1e-2, steps=STEPS, seed=0)
    first = results["aux"]
    assert torch.equal(again.loads, first.loads)
    assert again.task_loss == first.task_loss
    assert again.max_vio == first.max_vio
    assert again.eval_max_vio == first.eval_max_vio


def test_seed_changes_run(results):
    other = run_balancing_experiment("aux", 1e-2, steps=10, seed=1)
    assert not torch.equal(other.loads, results["aux"].loads[:10])


def test_shapes_and_bookkeeping(results):
    r = results["bias"]
    assert r.loads.shape == (STEPS, 8)
    assert r.bias.shape == (STEPS, 8)
    assert len(r.max_vio) == len(r.task_loss) == len(r.balance_loss) == STEPS == r.steps
    # every step routes B*S tokens to K experts each
    assert torch.all(r.loads.sum(1) == 8 * 32 * 2)
    assert r.max_vio[5] == pytest.approx(max_violation(r.loads[5]))
    # only the bias method moves the bias
    assert r.bias.abs().max() > 0
    assert torch.all(results["none"].bias == 0)
    assert results["none"].balance_loss == [0.0] * STEPS
    assert r.label == "bias update (loss-free), u=0.01"


def test_collapse_without_balancing(results):
    none = results["none"]
    # the rich-get-richer start really collapses: most tokens on the first experts
    assert none.max_vio[0] > 2.5
    assert none.eval_max_vio > 1.4
    assert none.mean_max_vio > 1.8
    # several experts (nearly) starve on held-out data: under 5% of their fair share
    fair = none.eval_load.mean()
    assert (none.eval_load < 0.05 * fair).sum() >= 3


def test_balancing_methods_balance(results):
    none = results["none"]
    for m in ("aux", "bias"):
        r = results[m]
        assert r.eval_max_vio < none.eval_max_vio - 0.8, m
        assert r.mean_max_vio < none.mean_max_vio - 0.8, m
        assert r.eval_max_vio < 0.8, m
    # z-loss keeps logits small; it is not a balancing method
    assert results["zloss"].eval_max_vio > 1.2


def test_sequence_wise_loss_balances():
    none = run_balancing_experiment("none", steps=STEPS)
    seq = run_balancing_experiment("seq", 1e-1, steps=STEPS)
    assert seq.mean_max_vio < none.mean_max_vio - 0.5


def test_task_is_learned(results):
    for r in results.values():
        assert sum(r.task_loss[-10:]) < sum(r.task_loss[:10]) * 0.5


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"method": "switch"}, "method='switch'"),
        ({"method": "aux", "coef": -1.0}, "coef=-1.0"),
        ({"method": "aux", "coef": float("inf")}, "coef=inf"),
        ({"method": "none", "steps": 0}, "steps=0"),
        ({"method": "none", "batch_size": 2.5}, "batch_size=2.5"),
    ],
)
def test_bad_input(kwargs, word):
    with pytest.raises(ValueError, match=word.replace("(", r"\(")):
        run_balancing_experiment(**kwargs)


def test_error_lists_methods():
    with pytest.raises(ValueError) as info:
        run_balancing_experiment("Aux")
    for m in METHODS:
        assert m in str(info.value)


def test_sweep_and_summary():
    res = run_sweep([("none", None), ("aux", 0.1)], steps=3)
    assert list(res) == ["no balancing", "aux loss (Switch), α=0.1"]
    s = res["no balancing"].summary()
    assert set(s) == {
        "method",
        "MaxVio_batch",
        "MaxVio_global",
        "task loss (last 20 steps)",
        "held-out task loss",
    }


def test_task_sample_shapes():
    task = make_task(hidden_size=16)
    x, y = task.sample(3, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 5, 16)


@pytest.mark.parametrize(
    "runs, label",
    [
        ([("aux", None), ("aux", 1e-2)], "aux loss (Switch), α=0.01"),  # None is aux's default, 1e-2
        ([("bias", 1e-3), ("none", None), ("bias", 1e-3)], "bias update (loss-free), u=0.001"),
    ],
)
def test_sweep_rejects_runs_with_one_label(runs, label):
    """Two runs under one label would silently keep only the last: say so instead, before any training."""
    with pytest.raises(ValueError, match="both give the label") as info:
        run_sweep(runs, steps=1)
    assert label in str(info.value) and repr(tuple(runs[-1])) in str(info.value)


def test_sweep_rejects_malformed_runs():
    with pytest.raises(ValueError, match=r"\(method, coef\) pair"):
        run_sweep([("aux",)], steps=1)
    with pytest.raises(TypeError, match="runs='aux'"):
        run_sweep("aux", steps=1)


@pytest.mark.parametrize(
    "call",
    [lambda: make_lab_moe(seed=3), lambda: run_balancing_experiment("aux", steps=2, seed=3)],
    ids=["make_lab_moe", "run_balancing_experiment"],
)
def test_lab_leaves_the_global_rng_alone(call):
    """Seeded runs (still deterministic) that do not reset the learner's RNG stream."""
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    call()
    assert torch.equal(torch.rand(3), expected)


def test_make_lab_moe_is_deterministic_whatever_the_global_seed():
    torch.manual_seed(0)
    a = make_lab_moe(seed=3).gate.weight
    torch.manual_seed(1)
    b = make_lab_moe(seed=3).gate.weight
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="seed=1.5"):
        make_lab_moe(seed=1.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1e-2}, "lr=-0.01"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"noise": float("nan")}, "noise=nan"),
        ({"noise": -0.5}, "noise=-0.5"),
        ({"eval_tokens": 0}, "eval_tokens=0"),
        ({"eval_tokens": -5}, "eval_tokens=-5"),
    ],
)
def test_lab_rejects_bad_numbers_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_balancing_experiment("none", steps=2, **kwargs)


def test_tradeoff_with_one_expert_draws_without_warnings():
    import warnings

    from glm4moe_lib.viz.balance import plot_tradeoff

    res = run_balancing_experiment("none", steps=3, num_experts=1, top_k=1, eval_tokens=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_tradeoff({res.label: res}, window=1)
