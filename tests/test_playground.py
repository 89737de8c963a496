"""The classroom playground: the simulation, the static figure and the dashboard (no browser)."""

import math

import pytest
import torch
from matplotlib.figure import Figure

from glm4moe_lib.balance import expert_load, max_violation
from glm4moe_lib.viz.playground import (
    BALANCING,
    MAX_EXPERTS,
    MAX_TOP_K,
    draw_playground,
    playground_figure,
    simulate_playground,
)
from glm4moe_lib.widgets.playground import LABELS, Playground


@pytest.fixture(scope="module")
def dash() -> Playground:
    return Playground()


def test_simulation_defaults_are_consistent():
    s = simulate_playground()
    assert s.weights.shape == (256, 8)
    chosen = (s.weights > 0).sum(-1)
    assert torch.equal(chosen, torch.full((256,), 2))  # exactly top-K experts per token
    torch.testing.assert_close(s.weights.sum(-1), torch.ones(256))  # normalized weights
    assert s.load.sum() == 256 * 2
    assert s.ideal_load == 64
    assert s.max_vio == pytest.approx(max_violation(s.load))
    assert s.max_vio > 0.3  # the toy batch is unbalanced before any balancing
    assert s.max_vio_history == [s.max_vio]


def test_simulation_is_deterministic():
    a = simulate_playground(balancing="switch aux loss", steps=10)
    b = simulate_playground(balancing="switch aux loss", steps=10)
    assert torch.equal(a.weights, b.weights) and a.max_vio_history == b.max_vio_history


@pytest.mark.parametrize("balancing", ["switch aux loss", "bias updates"])
@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
def test_balancing_lowers_maxvio(balancing, scoring_func):
    s = simulate_playground(balancing=balancing, scoring_func=scoring_func, steps=50)
    assert len(s.max_vio_history) == 51
    assert s.max_vio < 0.5 * s.max_vio_history[0]
    assert torch.equal(s.load_before, simulate_playground(scoring_func=scoring_func).load)


def test_bias_updates_change_choice_not_weights():
    base = simulate_playground()
    s = simulate_playground(balancing="bias updates", steps=50)
    assert s.bias is not None and s.bias.abs().sum() > 0
    assert not torch.equal(s.load, base.load)
    # the weights of each token still come from the unbiased sigmoid scores, renormalized
    torch.testing.assert_close(s.weights.sum(-1), torch.ones(256))


def test_temperature_changes_weights_not_choice():
    cold, hot = simulate_playground(temperature=0.3), simulate_playground(temperature=3.0)
    assert torch.equal(cold.weights > 0, hot.weights > 0)
    assert torch.equal(cold.load, hot.load)
    assert cold.weights.max() > hot.weights.max()


def test_experts_keep_their_identity_when_more_are_added():
    s4, s8 = simulate_playground(num_experts=4, top_k=1), simulate_playground(num_experts=8, top_k=1)
    assert s4.load.shape == (4,) and s8.load.shape == (8,)
    assert torch.equal(expert_load(s8.weights.argmax(-1), 8), s8.load)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_experts": 1}, "num_experts"),
        ({"num_experts": MAX_EXPERTS + 1}, "num_experts"),
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"balancing": "magic"}, "balancing"),
        ({"steps": -1}, "steps"),
    ],
)
def test_bad_values_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        simulate_playground(**kwargs)


@pytest.mark.parametrize("balancing", BALANCING)
def test_static_figure(balancing):
    fig = playground_figure(balancing=balancing, steps=20, scale=1.5)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4  # heatmap, its colour bar, load bars, MaxVio
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "MaxVio" in titles and "Routing" in titles
    assert fig.axes[0].images[0].get_cmap().name == "viridis"


def test_scale_only_applies_to_the_figure():
    import matplotlib as mpl

    before = mpl.rcParams["font.size"]
    fig = draw_playground(simulate_playground(), scale=2.0)
    assert mpl.rcParams["font.size"] == before
    assert fig.axes[0].title.get_fontsize() == pytest.approx(13 * 2.0)


def test_dashboard_builds(dash):
    labels = {c.description for c in dash.controls.values()}
    assert labels == set(LABELS.values())
    assert dash.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MaxVio" in dash.readout.value
    assert dash.redraw_seconds < 5  # well under a second on an idle CPU; generous for CI
    assert "application/vnd.jupyter.widget-view+json" in dash._repr_mimebundle_()


@pytest.mark.parametrize(
    "name, value",
    [
        ("num_experts", 16),
        ("top_k", 3),
        ("scoring_func", "softmax"),
        ("temperature", 0.3),
        ("balancing", "bias updates"),
        ("steps", 20),
    ],
)
def test_each_control_recomputes(name, value):
    dash = Playground()
    if name == "steps":
        dash.set(balancing="switch aux loss")
    image, state, redraws = dash.image.value, dash.state, dash.redraws
    dash.controls[name].value = value  # as the browser does: one trait change
    assert dash.redraws == redraws + 1
    assert dash.image.value != image
    assert dash.state is not state
    assert getattr(dash.state, name) == value


def test_fewer_experts_clamp_top_k(dash):
    dash.set(num_experts=8, top_k=8)
    dash.controls["num_experts"].value = 4
    assert dash.controls["top_k"].max == 4 and dash.settings["top_k"] == 4
    assert dash.state.top_k == 4 and dash.state.num_experts == 4
    dash.set(num_experts=8, top_k=2)


def test_set_clamps_numbers_and_rejects_bad_choices(dash):
    state = dash.set(num_experts=1000, top_k=50, temperature=-3, steps=10_000)
    assert (state.num_experts, state.top_k, state.temperature, state.steps) == (
        MAX_EXPERTS,
        MAX_TOP_K,
        0.1,
        200,
    )
    with pytest.raises(ValueError, match="balancing"):
        dash.set(balancing="magic")
    with pytest.raises(ValueError, match="not a playground control"):
        dash.set(colour="red")
    with pytest.raises(ValueError, match="top_k"):
        dash.set(top_k="two")
    dash.set(num_experts=8, top_k=2, temperature=1.0, steps=50)
