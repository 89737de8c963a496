"""bench.overlap_probe (do the experts' weight reads and multiply-adds overlap?) and its figure."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from glm4moe_lib import bench
from glm4moe_lib.dispatch import dispatch_combine
from glm4moe_lib.viz import perf

E, H, INTER, K = 16, 32, 16, 4


def _weights(experts: int = E):
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(experts, 2 * INTER, H, generator=gen) * H**-0.5  # [E, 2I, H]
    down = torch.randn(experts, H, INTER, generator=gen) * INTER**-0.5  # [E, H, I]
    return gate_up, down


@pytest.mark.parametrize(
    "tokens, experts, top_k", [(4, 16, 4), (16, 16, 4), (3, 8, 8), (6, 12, 2), (0, 8, 2)]
)
def test_even_routing_gives_every_expert_the_same_pairs(tokens, experts, top_k):
    ids = bench.even_routing(tokens, experts, top_k)  # [T, K]
    assert ids.shape == (tokens, top_k) and ids.dtype == torch.int64
    counts = torch.bincount(ids.flatten(), minlength=experts)
    assert counts.tolist() == [tokens * top_k // experts] * experts
    for row in ids.tolist():  # K different experts per token, as a router picks them
        assert len(set(row)) == top_k


@pytest.mark.parametrize(
    "tokens, experts, top_k, match",
    [
        (3, 16, 4, r"tokens=3 is not allowed: tokens \* top_k \(3 \* 4\) must be .* multiple of experts=16"),
        (-16, 16, 4, "tokens=-16 is not allowed"),
        (4, 4, 5, r"top_k=5 is not allowed: it must lie in \[1, experts=4\]"),
        (4, 4, 0, "top_k=0 is not allowed"),
    ],
)
def test_even_routing_names_what_is_wrong(tokens, experts, top_k, match):
    with pytest.raises(ValueError, match=match):
        bench.even_routing(tokens, experts, top_k)


def test_overlap_probe_times_the_call_the_read_and_the_hot_work(monkeypatch):
    """The call runs E experts with n tokens each, the hot step `hot_experts` experts with n each,
    both through the strategy asked for; compute_s is the hot step scaled by E / hot_experts."""
    gate_up, down = _weights()
    calls = []

    def recording(x, ids, w, gu, dn, strategy):
        counts = torch.bincount(ids.flatten(), minlength=gu.shape[0])
        calls.append((gu.shape[0], x.shape[0], tuple(counts.tolist()), strategy))
        return dispatch_combine(x, ids, w, gu, dn, strategy=strategy)

    monkeypatch.setattr(bench, "dispatch_combine", recording)
    rows = bench.overlap_probe(
        gate_up,
        down,
        K,
        tokens_per_expert=(1, 2),
        hot_experts=8,
        repeats=2,
        min_sample_s=0.0,
        strategy="sorted",
    )
    assert [(r["tokens_per_expert"], r["tokens"]) for r in rows] == [(1, 4), (2, 8)]
    for row in rows:
        assert set(row) == {"tokens_per_expert", "tokens", "call_s", "read_s", "compute_s"}
        assert all(row[k] > 0 for k in ("call_s", "read_s", "compute_s"))
    seen = set(calls)
    for n in (1, 2):
        assert (E, E * n // K, (n,) * E, "sorted") in seen  # the call: every expert n tokens
        assert (8, 8 * n // K, (n,) * 8, "sorted") in seen  # the hot work: 8 experts, n tokens each
    assert {c[0] for c in calls} == {E, 8}


def test_overlap_probe_scales_the_hot_work_to_all_experts(monkeypatch):
    """compute_s = (time of the hot step) * E / hot_experts: with a fake clock that charges each
    dispatch call its experts' count, the hot step of 4 experts must come out as E of them."""
    gate_up, down = _weights()
    clock = [0.0]

    def charged(x, ids, w, gu, dn, strategy):
        clock[0] += gu.shape[0] * 1e-3  # one ms per expert
        return x

    monkeypatch.setattr(bench, "dispatch_combine", charged)
    monkeypatch.setitem(bench.CLOCKS, "wall", lambda: clock[0])
    (row,) = bench.overlap_probe(
        gate_up, down, K, tokens_per_expert=(1,), hot_experts=4, repeats=2, min_sample_s=0
    )
    assert row["call_s"] == pytest.approx(E * 1e-3)
    assert row["compute_s"] == pytest.approx(E * 1e-3)  # 4 ms measured, times 16 / 4


def test_overlap_probe_sets_the_threads_back():
    gate_up, down = _weights()
    before = torch.get_num_threads()
    bench.overlap_probe(gate_up, down, K, tokens_per_expert=(1,), repeats=1, min_sample_s=0.0, threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokens_per_expert": (0,)}, r"tokens_per_expert has 0: each must be a positive int"),
        ({"tokens_per_expert": (1, 2.0)}, r"tokens_per_expert has 2.0"),
        ({"tokens_per_expert": (True,)}, r"tokens_per_expert has True"),
        (
            {"hot_experts": 6, "tokens_per_expert": (1,)},
            r"tokens_per_expert has 1: .* hot_experts \* n \(6 \* n\)",
        ),
        ({"hot_experts": 2}, r"hot_experts=2 is not allowed: it must lie in \[top_k=4, experts=16\]"),
        ({"hot_experts": 17}, "hot_experts=17 is not allowed"),
        ({"repeats": 0}, "repeats=0 is not allowed"),
        ({"threads": 0}, "threads=0 is not allowed"),
    ],
)
def test_overlap_probe_names_what_is_wrong(kwargs, match):
    gate_up, down = _weights()
    with pytest.raises(ValueError, match=match):
        bench.overlap_probe(gate_up, down, K, **kwargs)


def test_overlap_probe_rejects_weights_of_the_wrong_rank():
    gate_up, down = _weights()
    with pytest.raises(
        ValueError, match=r"gate_up \(32, 32\) and down .* must be \[E, 2I, H\] and \[E, H, I\]"
    ):
        bench.overlap_probe(gate_up[0], down, K)


def test_plot_overlap_draws_three_bars_and_both_bounds_per_row():
    rows = [
        {"tokens_per_expert": 1, "tokens": 16, "call_s": 4e-3, "read_s": 3.5e-3, "compute_s": 1e-3},
        {"tokens_per_expert": 4, "tokens": 64, "call_s": 5e-3, "read_s": 3.5e-3, "compute_s": 3.4e-3},
    ]
    fig = perf.plot_overlap(rows)
    assert isinstance(fig, matplotlib.figure.Figure)
    (ax,) = fig.axes
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted([4.0, 3.5, 1.0, 5.0, 3.5, 3.4])  # milliseconds
    levels = sorted(round(line.get_ydata()[0], 6) for line in ax.get_lines())
    assert levels == sorted([3.5, 4.5, 3.5, 6.9])  # max(read, compute) and their sum, per row
    labels = ax.get_legend_handles_labels()[1]
    assert labels.count("both at once (the limit)") == 1 and len(labels) == 5
