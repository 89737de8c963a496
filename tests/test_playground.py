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
from glm4moe_lib.widgets.playground import DEFAULTS, LABELS, Playground


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
        ("skew", 0.5),
        ("seed", 3),
        ("balancing", "bias updates"),
        ("strength", 0.1),
        ("steps", 20),
    ],
)
def test_each_control_recomputes(name, value):
    dash = Playground()
    if name in ("steps", "strength"):
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


# ---- balancing has a price; the batch can change ----------------------------------------------------


def test_aux_loss_strength_trades_balance_for_moved_picks():
    """alpha sets the trade-off against the stand-in task loss: more balance, more tokens moved."""
    weak, default = (simulate_playground(balancing="switch aux loss", strength=a) for a in (0.1, 1.0))
    start = weak.max_vio_history[0]
    assert start > default.max_vio_history[-1]
    assert weak.max_vio > default.max_vio and weak.moved < default.moved
    assert 0.5 * start < weak.max_vio < start  # a little balance, a few tokens moved
    assert default.max_vio < 0.5 * start and default.moved > 0.05
    assert (weak.coef, default.coef) == (0.1, 1.0)


def test_bias_strength_scales_the_step_u():
    one, five = (simulate_playground(balancing="bias updates", strength=s, steps=5) for s in (1.0, 5.0))
    assert five.coef == pytest.approx(5 * one.coef) and one.coef > 0
    assert five.bias.abs().max() == pytest.approx(5 * one.bias.abs().max())  # sign steps of u each


def test_moved_counts_picks_that_left_their_first_expert():
    none = simulate_playground()
    assert none.moved == 0.0 and none.coef == 0.0
    s = simulate_playground(balancing="bias updates")
    first = torch.zeros(256, 8).scatter_(1, (none.weights > 0).float().topk(2).indices, 1.0)
    now = (s.weights > 0).float()
    assert s.moved == pytest.approx(1 - float((first * now).sum()) / (256 * 2))
    assert 0 < s.moved < 1


def test_skew_and_seed_change_the_batch():
    flat, steep = simulate_playground(skew=0.0), simulate_playground(skew=4.0)
    assert flat.max_vio < simulate_playground().max_vio < steep.max_vio  # the shared direction skews
    other = simulate_playground(seed=3)
    assert not torch.equal(other.load, simulate_playground().load) and other.seed == 3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"strength": 0.0}, "strength"),
        ({"strength": 11.0}, "strength"),
        ({"skew": -1.0}, "skew"),
        ({"skew": "a"}, "skew"),
    ],
)
def test_new_parameters_are_checked(kwargs, name):
    with pytest.raises(ValueError, match=name):
        simulate_playground(**kwargs)


def test_reset_restores_the_start_and_redraws_once():
    dash = Playground(seed=4)
    assert dash.seed == 4 and dash.state.seed == 4
    dash.set(num_experts=16, balancing="bias updates", strength=3.0, skew=0.5, seed=7)
    redraws = dash.redraws
    dash.reset_button.click()  # as the browser does
    assert dash.redraws == redraws + 1
    assert dash.settings == {**DEFAULTS, "seed": 4}
    assert dash.state.balancing == "none" and dash.state.num_experts == 8


def test_set_clamps_the_log_slider_to_its_range(dash):
    assert dash.set(strength=1000).strength == 10.0
    assert dash.set(strength=1e-6).strength == pytest.approx(0.01)
    dash.set(strength=1.0)


def test_seed_outside_the_slider_is_refused():
    with pytest.raises(ValueError, match="seed"):
        Playground(seed=100)


def test_strength_and_steps_are_greyed_out_without_balancing():
    from glm4moe_lib.widgets.playground import Playground

    pg = Playground()
    assert pg.controls["balancing"].value == "none"
    assert pg.controls["strength"].disabled and pg.controls["steps"].disabled
    pg.set(balancing="bias updates")
    assert not pg.controls["strength"].disabled and not pg.controls["steps"].disabled
    pg.reset()
    assert pg.controls["strength"].disabled and pg.controls["steps"].disabled
