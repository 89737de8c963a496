"""Bad input to the figures (viz) and the widgets gets a clear error naming the parameter."""

import math

import matplotlib.pyplot as plt
import pytest
import torch

from glm4moe_lib.config import MoEConfig
from glm4moe_lib.viz import balance as vb
from glm4moe_lib.viz import dispatch as vd
from glm4moe_lib.viz import parallel as vp
from glm4moe_lib.viz import perf
from glm4moe_lib.viz import routing as vr
from glm4moe_lib.viz import training as vt
from glm4moe_lib.viz.core import use_course_style
from glm4moe_lib.viz.playground import playground_figure
from glm4moe_lib.widgets.balance import capacity_explorer, training_explorer
from glm4moe_lib.widgets.playground import Playground
from glm4moe_lib.widgets.routing import capacity_calculator, embed_text, routing_explorer


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---- viz.training -----------------------------------------------------------------------------


def test_routing_text_rejects_empty_text():
    with pytest.raises(ValueError, match="tokens is empty"):
        vt.plot_routing_text([], [], 4)


@pytest.mark.parametrize("view", [vt.plot_routing_text, vt.routing_html])
@pytest.mark.parametrize("bad", [-1, 4])
def test_routing_text_rejects_out_of_range_experts(view, bad):
    with pytest.raises(ValueError, match=rf"experts holds expert id {bad}.*n_experts=4"):
        view(["a", "b"], [0, bad], 4)


@pytest.mark.parametrize("view", [vt.plot_routing_text, vt.routing_html])
def test_routing_text_rejects_length_mismatch(view):
    with pytest.raises(ValueError, match="experts has 1 ids but tokens has 2"):
        view(["a", "b"], [0], 4)


@pytest.mark.parametrize("n", [-1, 0, 2.5, True])
def test_expert_colors_rejects_bad_count(n):
    with pytest.raises(ValueError, match="n_experts="):
        vt.expert_colors(n)


@pytest.mark.parametrize(
    "mats", [[], [torch.ones(4)], [torch.ones(2, 4), torch.ones(2, 3)]], ids=["empty", "1d", "ragged"]
)
def test_specialization_rejects_bad_matrices(mats):
    with pytest.raises(ValueError, match="matrices"):
        vt.plot_specialization(mats, ["a", "b"])


def test_specialization_rejects_domain_count_mismatch():
    with pytest.raises(ValueError, match="domains has 3 names"):
        vt.plot_specialization([torch.ones(2, 4)], ["a", "b", "c"])


def test_domain_losses_rejects_empty_metrics():
    with pytest.raises(ValueError, match="metrics"):
        vt.plot_domain_losses({})


def test_max_vio_rejects_runs_without_max_vio():
    run = {"train": [{"step": 0, "loss": 1.0, "max_vio": []}], "eval": []}
    with pytest.raises(ValueError, match="metrics has no run with a recorded 'max_vio'"):
        vt.plot_max_vio({"dense": run})


# ---- viz.balance / viz.routing ----------------------------------------------------------------


def test_balance_conventions_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match=r"top_ks=\(8,\).*num_experts=4"):
        vb.plot_balance_conventions(4, (8,))


@pytest.mark.parametrize("n_group", [0, -2, 2.0])
def test_group_selection_rejects_bad_n_group(n_group):
    choice, keep = torch.rand(3, 8), torch.ones(3, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="n_group="):
        vb.plot_group_selection(choice, keep, torch.zeros(3, 2, dtype=torch.long), n_group=n_group)


@pytest.mark.parametrize("bad", [-1, 8])
def test_group_selection_rejects_out_of_range_ids(bad):
    choice, keep = torch.rand(3, 8), torch.ones(3, 8, dtype=torch.bool)
    idx = torch.tensor([[0, 1], [2, bad], [4, 5]])
    with pytest.raises(ValueError, match=r"topk_indices holds ids .* \[0, 8\)"):
        vb.plot_group_selection(choice, keep, idx, n_group=2)


def test_gate_effect_rejects_empty_tensors():
    with pytest.raises(ValueError, match="gate has shape"):
        vr.plot_gate_effect(torch.empty(0, 4), torch.empty(0, 4))


# ---- viz.perf / viz.parallel ------------------------------------------------------------------


def test_times_rejects_no_modes():
    with pytest.raises(ValueError, match=r"modes=\(\)"):
        perf.plot_times({"results": [], "meta": {}}, modes=())


ROW = {"tokens_per_expert": 1, "tokens": 16, "call_s": 4e-3, "read_s": 3.5e-3, "compute_s": 1e-3}


def test_overlap_rejects_no_rows():
    with pytest.raises(ValueError, match="rows="):
        perf.plot_overlap([])


def test_overlap_rejects_nan_times():
    with pytest.raises(ValueError, match=r"rows\[0\]\['read_s'\]=nan"):
        perf.plot_overlap([{**ROW, "read_s": math.nan}])


def test_rank_load_rejects_no_ranks():
    with pytest.raises(ValueError, match="stats="):
        vp.plot_rank_load([])


def test_traffic_matrix_rejects_1d():
    with pytest.raises(ValueError, match=r"matrix has shape \(3,\)"):
        vp.plot_traffic_matrix(torch.ones(3))


# ---- style and playground ---------------------------------------------------------------------


def test_course_style_rejects_bad_scale():
    with pytest.raises(TypeError, match="scale='big'"):
        use_course_style("big")
    with pytest.raises(ValueError, match="scale=-1"):
        use_course_style(-1)


def test_playground_figure_rejects_nan_scale():
    with pytest.raises(ValueError, match="scale=nan"):
        playground_figure(scale=math.nan)


@pytest.mark.parametrize("kwargs", [{"seed": "x"}, {"seed": -1}, {"scale": 0}])
def test_playground_rejects_bad_seed_and_scale(kwargs):
    (name,) = kwargs
    with pytest.raises((ValueError, TypeError), match=f"{name}="):
        Playground(**kwargs)


# ---- widgets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_experts": 1000}, r"num_experts=1000 .*\[1, 256\]"),
        ({"num_experts": -1}, r"num_experts=-1 .*\[1, 256\]"),
        ({"hidden_size": 64}, r"hidden_size=64 .*\[256, 8192\] in steps of 256"),
        ({"hidden_size": 1000}, r"hidden_size=1000 .*in steps of 256"),
        ({"expert_size": 1000.5}, r"expert_size=1000.5 .*integer"),
        ({"top_k": 9, "num_experts": 8}, r"top_k=9 .*\[1, 8\]"),
    ],
)
def test_capacity_calculator_rejects_out_of_range(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        capacity_calculator(**kwargs)


def test_capacity_calculator_rejects_non_number():
    with pytest.raises(TypeError, match="hidden_size='big'"):
        capacity_calculator(hidden_size="big")


@pytest.mark.parametrize("factor", [10, -1, 1.3, "x"])
def test_capacity_explorer_rejects_bad_factor(factor):
    routings = {"r": torch.zeros(4, 2, dtype=torch.long)}
    with pytest.raises((ValueError, TypeError), match=r"capacity_factor=.*\[0.25, 4.0\] in steps of 0.25"):
        capacity_explorer(routings, 8, capacity_factor=factor)


def test_routing_explorer_rejects_unknown_scoring():
    with pytest.raises(ValueError, match="scoring='tanh'"):
        routing_explorer(scoring="tanh")


def test_training_explorer_rejects_non_results():
    with pytest.raises(TypeError, match=r"results\['a'\] is a int: expected a LabResult"):
        training_explorer({"a": 1})


def test_embed_text_rejects_non_string():
    with pytest.raises(TypeError, match="text=None"):
        embed_text(None)


def test_remaining_parallel_and_grid_plots_check_their_arguments():
    idx = [torch.tensor([[0, 5], [3, 7]]), torch.tensor([[1, 2], [6, 4]])]
    with pytest.raises(ValueError, match=r"topk_indices_per_rank\[1\] holds expert ids from 1 to 8"):
        vp.plot_token_routes([idx[0], idx[1] + torch.tensor([[0, 0], [0, 4]])], 8, 2)
    with pytest.raises(ValueError, match="one \\[T, K\\] tensor per rank: world_size=2, got 1"):
        vp.plot_token_routes(idx[:1], 8, 2)
    with pytest.raises(ValueError, match="keep_per_rank must hold one mask per rank"):
        vp.plot_token_routes(idx, 8, 2, [torch.ones(2, 2, dtype=torch.bool)])
    with pytest.raises(
        ValueError, match="world_sizes, measured and formula must be non-empty and of one length"
    ):
        vp.plot_comm_volume([2, 4], [1.0], [1.5, 2.5])
    with pytest.raises(ValueError, match="world_sizes is empty"):
        vp.plot_scale(MoEConfig(), [])
    plt.close("all")


# ---- bad input is rejected before a figure is made (none left open) ---------------------------


def _no_new_figure(call, error, match):
    before = set(plt.get_fignums())
    with pytest.raises(error, match=match):
        call()
    assert set(plt.get_fignums()) == before, "a figure was left open by a call that raised"


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((100, 0, 2), ValueError, r"num_experts=0 .*>= 1"),
        ((-5, 4, 2), ValueError, r"num_tokens=-5 .*>= 0"),
        ((100, 4, 8), ValueError, r"top_k=8 .*\[1, 4\]"),
        ((100, 4, 2, 0.0), ValueError, r"capacity_factor=0.0 .*> 0"),
        ((100, 4, 2, "1.25"), TypeError, r"capacity_factor='1.25'"),
        ((100.5, 4, 2), TypeError, r"num_tokens=100.5 .*integer"),
    ],
)
def test_dispatch_memory_rejects_bad_sizes(args, error, match):
    with pytest.raises(error, match=match):
        vd.dispatch_memory(*args)


def test_dispatch_memory_figure_rejects_bad_token_counts():
    _no_new_figure(lambda: vd.plot_dispatch_memory(token_counts=[64, 0]), ValueError, r"token_counts\[1\]=0")
    _no_new_figure(lambda: vd.plot_dispatch_memory(token_counts=[]), ValueError, "token_counts=")


@pytest.mark.parametrize("window, error", [(2.5, TypeError), (0, ValueError), (-3, ValueError)])
def test_smoothing_window_is_checked_before_the_figure(window, error, lab_results):
    metrics = {"train": [{"step": 0, "loss": 3.0, "max_vio": [0.5]}], "eval": []}
    for call in (
        lambda: vb.plot_tradeoff(lab_results, window=window),
        lambda: vt.plot_loss_curves(metrics, window=window),
        lambda: vt.plot_max_vio({**metrics, "model_config": {"first_k_dense_replace": 0}}, window=window),
        lambda: vb.smooth([1.0, 2.0], window),
        lambda: vt.smooth([1.0, 2.0], window),
    ):
        _no_new_figure(call, error, f"window={window}")


@pytest.mark.parametrize("plot", [vb.plot_training_step, vb.plot_bias_trajectories])
@pytest.mark.parametrize("bad", [{}, None, [1]])
def test_single_run_figures_want_a_lab_result(plot, bad):
    _no_new_figure(lambda: plot(bad), TypeError, "expected a LabResult")


def test_layer_loads_want_one_name_per_layer():
    loads = [torch.ones(4), torch.tensor([4.0, 0, 0, 0]), torch.ones(4)]
    _no_new_figure(
        lambda: vb.plot_layer_loads(loads, ["layer 1"]),
        ValueError,
        "layer_names has 1 names but loads has 3 layers",
    )
    _no_new_figure(lambda: vb.plot_layer_loads(loads[:1], ["a", "b"]), ValueError, "layer_names has 2 names")


def test_dropped_vs_capacity_checks_every_routing():
    good = torch.tensor([[0, 1], [2, 3]])
    _no_new_figure(
        lambda: vd.plot_dropped_vs_capacity({"a": good, "b": good + 6}, 8),
        ValueError,
        r"routings\['b'\] holds expert ids",
    )
    _no_new_figure(
        lambda: vd.plot_dropped_vs_capacity({"empty": good[:0]}, 8),
        ValueError,
        r"routings\['empty'\] .*no \(token, slot\) pairs",
    )
    _no_new_figure(
        lambda: vd.plot_dropped_vs_capacity({f"r{i}": good for i in range(33)}, 8),
        ValueError,
        "at most 32 lines",
    )
    _no_new_figure(
        lambda: vd.plot_dropped_vs_capacity({"a": good}, 8, [1.0, -1.0]), ValueError, "capacity_factors=-1.0"
    )


def test_capacity_explorer_checks_every_routing_up_front():
    """A bad routing is named when the widget is built, not later when the dropdown reaches it."""
    routings = {"fine": torch.tensor([[0, 1]]), "bad": torch.tensor([[9, 1]])}
    with pytest.raises(ValueError, match=r"routings\['bad'\] holds expert ids from 1 to 9: .*\[0, 8\)"):
        capacity_explorer(routings, 8)
    with pytest.raises(TypeError, match=r"routings\['list'\] is a list"):
        capacity_explorer({"fine": routings["fine"], "list": [[1, 2]]}, 8)
    with pytest.raises(ValueError, match=r"routings\['flat'\] has shape \(2,\)"):
        capacity_explorer({"flat": torch.tensor([0, 1])}, 8)


@pytest.fixture(scope="module")
def lab_results():
    from glm4moe_lib.lab import run_sweep

    return run_sweep([("none", None), ("aux", 1e-2)], steps=2)


def test_plot_times_labels_the_measured_token_counts_plainly():
    from glm4moe_lib import bench
    from glm4moe_lib.viz import perf

    res = perf.load_results(bench.RESULTS_DIR / "results_cpu.json")
    fig = perf.plot_times(res, modes=("forward",))
    tokens = sorted({r["tokens"] for r in res["results"] if r["mode"] == "forward"})
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(t) for t in tokens]  # not 2^k
