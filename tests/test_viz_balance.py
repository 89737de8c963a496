"""Figures of lessons 05–07 build, and the widgets redraw when a control changes."""

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

from glm4moe_lib.lab import run_sweep
from glm4moe_lib.viz import balance as vb
from glm4moe_lib.viz import dispatch as vd
from glm4moe_lib.viz.core import PALETTE
from glm4moe_lib.widgets.balance import capacity_explorer, training_explorer


@pytest.fixture(scope="module")
def results():
    return run_sweep([("none", None), ("bias", 1e-2)], steps=8)


@pytest.fixture(scope="module")
def routing():
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(64)])
    skewed = idx.clone()
    had_0 = skewed[:40, 1] == 0  # expert 0 already second: swap, so a token's two experts stay distinct
    skewed[:40, 1] = torch.where(had_0, skewed[:40, 0], skewed[:40, 1])
    skewed[:40, 0] = 0
    assert (skewed[:, 0] != skewed[:, 1]).all()
    return {"random": idx, "skewed": skewed}


def test_capacity_numbers():
    assert vd.expert_capacity(10, 4, 2, 1.0) == 5
    assert vd.expert_capacity(7, 4, 2, 1.0) == 4  # ceil(3.5)
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2]])
    cap, dropped = vd.capacity_drops(idx, 4, 1.0)
    assert (cap, dropped) == (2, 1)
    keep = vd.capacity_keep_mask(idx, 4, cap)
    assert keep.shape == (4, 2) and int((~keep).sum()) == dropped
    assert not keep[2, 0]  # expert 0's third first-choice is the one dropped
    assert vd.dropped_fraction(idx, 4, [1.0, 4.0]) == [1 / 8, 0.0]
    with pytest.raises(ValueError, match="capacity_factor=0"):
        vd.expert_capacity(4, 4, 1, 0)


def test_dispatch_memory_grows_quadratically():
    small = vd.dispatch_memory(1024, 64, 8)
    big = vd.dispatch_memory(2048, 64, 8)
    assert big["capacity masks"] / small["capacity masks"] == pytest.approx(4, rel=0.01)
    assert big["sorted indices"] / small["sorted indices"] == pytest.approx(2, rel=0.01)


def test_dispatch_figures(routing):
    idx = routing["random"][:6]
    w = torch.full((6, 2), 0.5)
    for fig in (
        vd.plot_permutation(idx, 8, w),
        vd.plot_permutation(idx, 8),
        vd.plot_capacity_drops(routing["skewed"], 8, 1.25),
        vd.plot_dropped_vs_capacity(routing, 8, [0.5, 1.0, 2.0]),
        vd.plot_dispatch_memory(token_counts=[64, 128]),
    ):
        assert isinstance(fig, Figure)
    with pytest.raises(ValueError, match="at most 64"):
        vd.plot_permutation(routing["random"], 8)
    with pytest.raises(ValueError, match="top_k_index has shape"):
        vd.plot_capacity_drops(torch.zeros(4, dtype=torch.long), 8, 1.0)


def test_balance_figures(results):
    r = results["no balancing"]
    assert vb.relative_load(r).shape == (8, 8)
    assert vb.relative_load(r).mean() == pytest.approx(1.0)
    for fig in (
        vb.plot_training_step(r),
        vb.plot_training_step(r, 0),
        vb.plot_load_grid(results),
        vb.plot_tradeoff(results, window=3),
        vb.plot_bias_trajectories(results["bias update (loss-free), u=0.01"]),
        vb.plot_balance_conventions(),
        vb.plot_layer_loads([torch.rand(8), torch.rand(8)], ["layer 1", "layer 2"]),
    ):
        assert isinstance(fig, Figure)
    with pytest.raises(ValueError, match="step=8"):
        vb.plot_training_step(r, 8)
    with pytest.raises(ValueError, match="results"):
        vb.plot_tradeoff({})
    with pytest.raises(ValueError, match="same experts"):
        vb.plot_layer_loads([torch.rand(8), torch.rand(4)])


def test_bias_trajectories_use_distinct_qualitative_colours(results):
    """One line per expert, each in its own Okabe–Ito colour (not a sequential colormap)."""
    fig = vb.plot_bias_trajectories(results["bias update (loss-free), u=0.01"])
    colors = [line.get_color() for line in fig.axes[0].get_lines()[:8]]
    assert colors == PALETTE[:8]


def test_conventions():
    conv = vb.balance_conventions(8, (1, 2, 4))
    assert conv["transformers (E·Σ f·P)"] == [1.0, 2.0, 4.0]
    assert conv["DeepSeek-V3 sequence-wise"] == [1.0, 1.0, 1.0]


def test_smooth():
    assert list(vb.smooth([1.0, 3.0, 5.0], 2)) == [1.0, 2.0, 4.0]


def test_training_explorer_redraws(results):
    box = training_explorer(results)
    assert box.redraw_count == 1 and isinstance(box.figure, Figure)
    assert box.controls["step"].value == 7
    assert all(c.description for c in box.controls.values())
    first = box.figure
    box.controls["step"].value = 2
    assert box.redraw_count == 2 and box.figure is not first
    assert any("step 2:" in ax.get_title() for ax in box.figure.axes)
    box.controls["method"].value = "bias update (loss-free), u=0.01"
    assert box.redraw_count == 3
    assert "bias update" in box.figure.axes[0].get_title()
    with pytest.raises(ValueError, match="method='x'"):
        training_explorer(results, method="x")


def test_capacity_explorer_redraws(routing):
    box = capacity_explorer(routing, 8)
    assert box.redraw_count == 1
    assert all(c.description for c in box.controls.values())
    box.controls["capacity_factor"].value = 3.0
    assert box.redraw_count == 2
    assert "0 of 128 pairs dropped" in box.figure.axes[0].get_title()
    box.controls["routing"].value = "skewed"
    assert box.redraw_count == 3


def test_group_selection_figure():
    from glm4moe_lib import MoEConfig, group_limited_mask, route

    logits = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    cfg = MoEConfig(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    r = route(logits, cfg)
    keep = group_limited_mask(r.scores, 4, 2)
    fig = vb.plot_group_selection(r.scores, keep, r.topk_indices, 4, [f"t{i}" for i in range(6)])
    assert isinstance(fig, Figure)
    with pytest.raises(ValueError, match="n_group=5"):
        vb.plot_group_selection(r.scores, keep, r.topk_indices, 5)


def test_capacity_helpers_follow_device(device):
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2]], device=device)
    assert vd.capacity_drops(idx, 4, 1.0) == (2, 1)
    keep = vd.capacity_keep_mask(idx, 4, 2)
    assert keep.device == idx.device and int((~keep).sum()) == 1
    assert isinstance(vd.plot_permutation(idx, 4, torch.full((4, 2), 0.5, device=device)), Figure)
    assert isinstance(vd.plot_capacity_drops(idx, 4, 1.0), Figure)


def test_run_styles(results):
    more = dict(results)
    more.update(run_sweep([("aux", 1e-3), ("aux", 1e-1)], steps=2))
    styles = vb.run_styles(more)
    assert styles["no balancing"] == (vb.METHOD_COLORS["none"], "-")
    assert styles["aux loss (Switch), α=0.1"][1] == "-"
    assert styles["aux loss (Switch), α=0.001"][1] == "--"
    assert len({styles[k] for k in more}) == len(more)


def test_run_styles_give_every_coefficient_its_own_style():
    """Four or more coefficients of one method: each its own line style (and marker), solid = largest."""
    coefs = [1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    more = run_sweep([("aux", c) for c in coefs], steps=1)
    styles = vb.run_styles(more)
    assert len({styles[k] for k in more}) == len(coefs)
    assert styles["aux loss (Switch), α=0.1"] == (vb.METHOD_COLORS["aux"], "-")
    assert [styles[f"aux loss (Switch), α={c:g}"][1] for c in sorted(coefs, reverse=True)[:4]] == [
        "-",
        "--",
        ":",
        "-.",
    ]
    fig = vb.plot_tradeoff(more, window=1)
    scatter_markers = {tuple(map(tuple, c.get_paths()[0].vertices.round(3))) for c in fig.axes[2].collections}
    assert len(scatter_markers) == len(coefs)


def test_capacity_drops_with_no_pairs():
    """Zero tokens: no division by zero; the title says there is nothing to route."""
    empty = torch.zeros(0, 2, dtype=torch.long)
    before = set(plt.get_fignums())
    fig = vd.plot_capacity_drops(empty, 8, 1.25)
    assert "no pairs to route" in fig.axes[0].get_title()
    assert set(plt.get_fignums()) == before
    box = capacity_explorer({"some": torch.tensor([[0, 1]]), "none": empty}, 8)
    box.controls["routing"].value = "none"
    assert "no pairs to route" in box.figure.axes[0].get_title()


def test_dropped_vs_capacity_tells_more_than_eight_routings_apart(routing):
    many = {f"routing {i}": routing["random"] for i in range(12)}
    fig = vd.plot_dropped_vs_capacity(many, 8, [1.0, 2.0])
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() in many]
    assert len(lines) == 12
    looks = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines}
    assert len(looks) == 12


@pytest.mark.parametrize(
    "elem_size, dtype", [(2, "(bf16)"), (4, "(fp32)"), (1, "(fp8)"), (3, "(3-byte elements)")]
)
def test_scale_title_names_the_element_type(elem_size, dtype):
    from glm4moe_lib.config import GLM45
    from glm4moe_lib.viz.parallel import plot_scale

    fig = plot_scale(GLM45, [2, 4, 8], elem_size=elem_size)
    assert fig.axes[0].get_title().endswith(dtype)


@pytest.mark.parametrize("num_experts, top_k, top", [(1, 1, 1.05), (2, 2, 1.05), (3, 2, 0.525), (8, 2, 3.15)])
def test_tradeoff_pads_only_a_zero_worst_case(num_experts, top_k, top):
    """K = E (worst MaxVio 0) draws without matplotlib's identical-limits warning; any other
    layout keeps its y-axis at 1.05 x the worst MaxVio, E/K - 1."""
    import warnings

    from glm4moe_lib.lab import run_balancing_experiment

    res = run_balancing_experiment("none", steps=2, num_experts=num_experts, top_k=top_k, eval_tokens=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = vb.plot_tradeoff({res.label: res}, window=1)
    assert fig.axes[0].get_ylim() == pytest.approx((0.0, top))
