"""Figures and widgets of lessons 01–04 (and lesson 05's dispatch picture): right axes and data, redraw
on control changes, clear errors."""

import time

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from glm4moe_lib import MoEConfig, route
from glm4moe_lib.router import RouterOutput
from glm4moe_lib.viz.core import PALETTE, ink
from glm4moe_lib.viz.dispatch import plot_permutation
from glm4moe_lib.viz.parallel import plot_token_routes
from glm4moe_lib.viz.routing import (
    capacity_numbers,
    dense_weights,
    plot_capacity,
    plot_decoder_stack,
    plot_gate_effect,
    plot_moe_diagram,
    plot_routing,
)
from glm4moe_lib.viz.training import expert_colors, plot_routing_text, routing_html
from glm4moe_lib.widgets.routing import (
    capacity_calculator,
    embed_text,
    routing_explorer,
    routing_explorer_figure,
)


def _routing(t=6, e=8, k=2, scoring="softmax", device="cpu"):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(t, e, generator=g).to(device)
    cfg = MoEConfig(hidden_size=1, n_routed_experts=e, num_experts_per_tok=k, scoring_func=scoring)
    return route(logits, cfg)


# ---- plot_routing ---------------------------------------------------------------------------------


def test_plot_routing_heatmap_and_load_bars(device):
    r = _routing(device=device)
    tokens = [f"t{i}" for i in range(6)]
    fig = plot_routing(r, tokens)
    assert isinstance(fig, Figure)
    ax_map, ax_load = fig.axes[0], fig.axes[1]
    img = ax_map.get_images()[0].get_array()
    expected = dense_weights(r.topk_weights, r.topk_indices, 8).cpu().numpy()
    np.testing.assert_allclose(np.asarray(img), expected, rtol=1e-6)
    assert [t.get_text() for t in ax_map.get_yticklabels()] == tokens
    heights = [p.get_height() for p in ax_load.patches]
    counts = torch.bincount(r.topk_indices.flatten().cpu(), minlength=8).tolist()
    assert heights == counts
    assert ax_load.lines[0].get_ydata()[0] == pytest.approx(6 * 2 / 8)  # balanced level T*K/E


def test_plot_routing_scores_marks_chosen_experts():
    r = _routing(scoring="sigmoid")
    fig = plot_routing(r, show="scores")
    np.testing.assert_allclose(
        np.asarray(fig.axes[0].get_images()[0].get_array()), r.scores.numpy(), rtol=1e-6
    )
    dots = fig.axes[0].collections[0].get_offsets()
    assert len(dots) == 6 * 2
    assert sorted(map(tuple, np.asarray(dots).astype(int).tolist())) == sorted(
        (int(e), t) for t in range(6) for e in r.topk_indices[t]
    )


def test_dense_weights_rows_sum_to_topk_weights():
    r = _routing()
    d = dense_weights(r.topk_weights, r.topk_indices, 8)
    assert d.shape == (6, 8)
    torch.testing.assert_close(d.sum(-1), r.topk_weights.sum(-1))
    assert int((d > 0).sum()) == 12


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"routing": "nope"}, "routing="),
        ({"tokens": ["a", "b"]}, "tokens has 2 labels"),
        ({"show": "logits"}, "show='logits'"),
        ({"max_tokens": 3}, "max_tokens=3"),
    ],
)
def test_plot_routing_bad_inputs(kwargs, match):
    routing = kwargs.pop("routing", _routing())
    with pytest.raises(ValueError, match=match):
        plot_routing(routing, **kwargs)


def test_plot_routing_rejects_1d_routing():
    bad = RouterOutput(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="expected \\[tokens, experts\\]"):
        plot_routing(bad)


# ---- capacity ------------------------------------------------------------------------------------


def test_capacity_numbers_match_the_seed_claim_exactly():
    one = capacity_numbers(100, 2, 1024, 2816)
    assert one["moe_total_params"] == 100 * 1024 + 100 * 3 * 1024 * 2816
    assert one["moe_active_params"] == 100 * 1024 + 2 * 3 * 1024 * 2816
    assert one["dense_flops"] == 2 * one["dense_params"]
    assert one["param_ratio"] == pytest.approx(100, rel=1e-3)
    assert one["flop_ratio"] == pytest.approx(2, rel=1e-2)
    two = capacity_numbers(100, 2, 1024, 2816, dense_size=2 * 2816)
    assert two["param_ratio"] == pytest.approx(50, rel=1e-3)
    assert two["flop_ratio"] == pytest.approx(1, rel=1e-2)


def test_plot_capacity_bars():
    fig = plot_capacity(num_experts=10, top_k=2, hidden_size=4, expert_size=8)
    n = capacity_numbers(10, 2, 4, 8)
    params = [p.get_height() for p in fig.axes[0].patches]
    flops = [p.get_height() for p in fig.axes[1].patches]
    assert params == [n["dense_params"], n["moe_total_params"], n["moe_active_params"]]
    assert flops == [n["dense_flops"], n["moe_active_flops"], n["moe_all_experts_flops"]]


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 1, 8, 8), "num_experts=0"),
        ((4, 5, 8, 8), "top_k=5"),
        ((4, 2, -1, 8), "hidden_size=-1"),
        ((4, 2, 8, 2.5), "expert_size=2.5"),
    ],
)
def test_capacity_bad_inputs(args, match):
    with pytest.raises((ValueError, TypeError), match=match):  # (TypeError: not an integer at all)
        capacity_numbers(*args)


def test_capacity_takes_numpy_integers():
    import numpy as np

    assert capacity_numbers(np.int64(8), np.int64(2), 16, 8) == capacity_numbers(8, 2, 16, 8)


# ---- diagrams ------------------------------------------------------------------------------------


def test_plot_moe_diagram_colours_chosen_experts():
    fig = plot_moe_diagram(num_experts=6, chosen=(0, 4), weights=(0.7, 0.3), shared=True)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "w=0.70" in texts and "w=0.30" in texts
    assert any("shared" in t for t in texts)
    with pytest.raises(ValueError, match="chosen="):
        plot_moe_diagram(num_experts=4, chosen=(4,))
    with pytest.raises(ValueError, match="scoring="):
        plot_moe_diagram(scoring="tanh")
    with pytest.raises(ValueError, match="weights has 1 values"):
        plot_moe_diagram(chosen=(0, 1), weights=(1.0,))


def test_plot_decoder_stack_counts_layers():
    fig = plot_decoder_stack(10, 3, num_mtp_layers=1)
    assert len(fig.axes[0].patches) == 11
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["dense FFN (3)", "MoE (7)", "MTP (1)"]
    with pytest.raises(ValueError, match="first_k_dense_replace=11"):
        plot_decoder_stack(10, 11)


def test_plot_gate_effect():
    gate, up = torch.randn(5, 7), torch.randn(5, 7)
    fig = plot_gate_effect(gate, up)
    maps = [ax for ax in fig.axes if ax.get_images()]  # colour bars are axes too: skip them
    assert len(maps) == 3
    prod = np.asarray(maps[2].get_images()[0].get_array())
    np.testing.assert_allclose(prod, (torch.nn.functional.silu(gate) * up).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="same \\[N, I\\]"):
        plot_gate_effect(gate, up[:, :3])


# ---- plot_permutation (lesson 05's dispatch picture) ----------------------------------------------


def _contrast(rgb_a, rgb_b):
    """WCAG contrast ratio of two sRGB colours (1 = identical, 21 = black on white)."""

    def luminance(rgb):
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((luminance(rgb_a), luminance(rgb_b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_plot_permutation_text_contrasts_with_every_box():
    num_experts = 2 * len(PALETTE)  # every expert colour, twice (the palette repeats)
    idx = torch.arange(num_experts).reshape(-1, 2)  # [8, 2]: every expert chosen once
    weights = torch.full(idx.shape, 0.5)
    ax = plot_permutation(idx, num_experts, weights).axes[0]
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    checked, ink_on = 0, {}
    for text in ax.texts:
        x, y = text.get_position()
        box = next(
            (
                b
                for b in boxes
                if b.get_x() <= x <= b.get_x() + b.get_width()
                and b.get_y() <= y <= b.get_y() + b.get_height()
            ),
            None,
        )
        if box is None:  # titles and the "e3: 2" block labels sit on the white background
            continue
        r, g, b_, a = box.get_facecolor()
        fill = tuple(a * c + (1 - a) for c in (r, g, b_))  # as drawn: alpha over the white page
        ratio = _contrast(fill, to_rgb(text.get_color()))
        assert ratio >= 4.5, f"'{text.get_text()}' ({text.get_color()}) on {fill}: contrast {ratio:.2f}"
        ink_on[tuple(round(c, 3) for c in fill)] = text.get_color()
        checked += 1
    assert checked == 2 * idx.numel() + idx.shape[0]  # both pair columns, and the out[t] boxes
    black_box = tuple(round(0.85 * c + 0.15, 3) for c in to_rgb("#000000"))
    assert ink_on[black_box] == "white"  # expert 7's black box: white text, not black on black


@pytest.mark.parametrize("fill", [*PALETTE, *[f"#{v:02x}{v:02x}{v:02x}" for v in range(0, 256, 15)]])
def test_ink_is_readable_on_any_fill(fill):
    """Black or white, whichever contrasts more: at least 4.5:1 (WCAG AA) on every palette colour."""
    assert _contrast(to_rgb(fill), to_rgb(ink(fill))) >= 4.5


def test_token_routes_expert_ids_are_readable_on_every_rank_colour():
    world = len(PALETTE)  # one rank per palette colour: orange, yellow, sky blue included
    idx = [torch.tensor([[r, (r + 1) % world]]) for r in range(world)]  # [1, 2] per rank, 1 expert per rank
    fig = plot_token_routes(idx, world, world)
    checked = 0
    for ax in fig.axes:
        fills = {
            (p.get_x(), p.get_y()): p.get_facecolor()[:3] for p in ax.patches if isinstance(p, Rectangle)
        }
        for text in ax.texts:
            x, y = text.get_position()
            fill = fills[(round(x - 0.47, 6), round(y - 0.45, 6))]
            ratio = _contrast(fill, to_rgb(text.get_color()))
            assert ratio >= 4.5, (
                f"expert {text.get_text()} ({text.get_color()}) on {fill}: contrast {ratio:.2f}"
            )
            checked += 1
    assert checked == 2 * world


@pytest.mark.parametrize("n_experts", [8, 16])
def test_routing_text_colours_are_readable(n_experts):
    """The coloured-text views (HTML and figure) pick a text colour readable on every expert colour."""
    tokens = [chr(ord("a") + e % 26) for e in range(n_experts)]
    fig = plot_routing_text(tokens, list(range(n_experts)), n_experts)
    colors = expert_colors(n_experts)
    for e, text in enumerate(fig.axes[0].texts[:n_experts]):
        assert _contrast(to_rgb(colors[e]), to_rgb(text.get_color())) >= 4.5, (colors[e], text.get_color())
    html = routing_html(tokens, list(range(n_experts)), n_experts)
    for c in colors:
        text = "#000000" if f"background:{c};color:#000000" in html else "#FFFFFF"
        assert f"background:{c};color:{text}" in html
        assert _contrast(to_rgb(c), to_rgb(text)) >= 4.5, (c, text)


# ---- widgets -------------------------------------------------------------------------------------


def test_embed_text_is_deterministic_per_word():
    words, x = embed_text("The cat and the dog.", hidden_size=8)
    assert words == ["the", "cat", "and", "the", "dog", "."]
    assert x.shape == (6, 8)
    torch.testing.assert_close(x[0], x[3])
    assert not torch.allclose(x[0], x[1])
    _, again = embed_text("the", hidden_size=8)
    torch.testing.assert_close(again[0], x[0])
    with pytest.raises(ValueError, match="hidden_size=0"):
        embed_text("a", hidden_size=0)
    with pytest.raises(ValueError, match="text="):
        embed_text("   ")


def _heatmap_data(fig):
    return np.asarray(fig.axes[0].get_images()[0].get_array()).copy()


def test_routing_explorer_builds_and_redraws():
    w = routing_explorer()
    assert set(w.controls) == {
        "top_k",
        "temperature",
        "scoring",
        "bias_expert",
        "bias",
        "renormalize",
        "show",
    }
    assert all(c.description for c in w.controls.values())
    assert w.redraw_count == 1 and isinstance(w.figure, Figure)
    first = _heatmap_data(w.figure)
    w.controls["top_k"].value = 3
    assert w.redraw_count == 2
    assert w.routing.topk_indices.shape[1] == 3
    assert not np.allclose(first, _heatmap_data(w.figure))
    w.controls["scoring"].value = "sigmoid"
    w.controls["bias_expert"].value = 5
    w.controls["bias"].value = 1.0  # a big bias: expert 5 is chosen by every token
    assert (w.routing.topk_indices == 5).any(-1).all()
    w.controls["renormalize"].value = False
    assert not torch.allclose(w.routing.topk_weights.sum(-1), torch.ones(w.routing.topk_weights.shape[0]))
    assert w.redraw_count == 6


def test_routing_explorer_default_matches_static_figure():
    words, x = embed_text("a b c d", hidden_size=4)
    weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    w = routing_explorer(x, words, weight)
    fig, routing = routing_explorer_figure(x @ weight.T, words)
    np.testing.assert_allclose(_heatmap_data(w.figure), _heatmap_data(fig))


def test_routing_explorer_redraws_fast():
    w = routing_explorer()
    start = time.perf_counter()
    for k in (3, 4, 2):
        w.controls["top_k"].value = k
        w.figure.canvas.draw()  # include rendering, as the notebook does
    assert (time.perf_counter() - start) / 3 < 1.0


def test_routing_explorer_bad_inputs():
    x, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="x and weight go together"):
        routing_explorer(x)
    with pytest.raises(ValueError, match="expected \\[T, H\\] and \\[E, H\\]"):
        routing_explorer(x, None, torch.randn(5, 3))
    with pytest.raises(ValueError, match="tokens has 2 labels"):
        routing_explorer(x, ["a", "b"], weight)
    with pytest.raises(ValueError, match="top_k=6"):
        routing_explorer(x, None, weight, top_k=6)
    with pytest.raises(ValueError, match="bias_expert=9"):
        routing_explorer_figure(x @ weight.T, bias_expert=9)


def test_capacity_calculator_redraws_and_clamps_top_k():
    w = capacity_calculator()
    assert all(c.description for c in w.controls.values())
    before = [p.get_height() for p in w.figure.axes[0].patches]
    w.controls["num_experts"].value = 100
    after = [p.get_height() for p in w.figure.axes[0].patches]
    assert after[1] > before[1] and w.redraw_count == 2
    w.controls["num_experts"].value = 3
    assert w.controls["top_k"].max == 3
    assert w.controls["top_k"].value <= 3
