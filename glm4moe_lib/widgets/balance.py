"""Interactive controls for lessons 05–06: the capacity explorer and the training explorer.

Each widget is an ``ipywidgets.VBox``: a row of labelled controls and one ``Output`` that holds one
matplotlib figure, redrawn when a control changes. The figure comes from the same function the
notebook's static cell calls (``viz.dispatch.plot_capacity_drops`` / ``viz.balance.plot_training_step``),
so the static twin shows exactly the widget's default view. The box carries ``controls`` (a dict
of the controls by name), ``output``, ``figure`` (the last figure drawn), ``redraw_count`` and
``redraw()``, for tests and for driving it from code.
"""

from __future__ import annotations

from collections.abc import Mapping

import ipywidgets as widgets
from matplotlib.figure import Figure
from torch import Tensor

from ..lab import LabResult
from ..viz.balance import plot_training_step
from ..viz.dispatch import check_routings, plot_capacity_drops
from .core import attach_redraw, check_slider_value

__all__ = ["capacity_explorer", "training_explorer"]

_STYLE = {"description_width": "initial"}
#: (min, max, step) of capacity_explorer's capacity-factor slider.
_FACTOR_RANGE = (0.25, 4.0, 0.25)


def training_explorer(
    results: Mapping[str, LabResult], method: str | None = None, step: int | None = None
) -> widgets.VBox:
    """Pick a run (``method``) and slide through its training ``step``s: the expert × step load
    heatmap with the chosen step marked, and that step's load bars and MaxVio."""
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty dict {label: LabResult} (see lab.run_sweep)")
    for name, r in results.items():
        if not isinstance(r, LabResult):
            raise TypeError(
                f"results[{name!r}] is a {type(r).__name__}: expected a LabResult (see lab.run_sweep)"
            )
    labels = list(results)
    method = labels[0] if method is None else method
    if method not in results:
        raise ValueError(f"method={method!r} is not allowed: use one of {labels}")
    steps = min(r.steps for r in results.values())
    step = steps - 1 if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < steps:
        raise ValueError(f"step={step!r} is not allowed: it must be an integer in [0, {steps - 1}]")
    controls = {
        "method": widgets.Dropdown(options=labels, value=method, description="method", style=_STYLE),
        "step": widgets.IntSlider(
            value=step, min=0, max=steps - 1, description="step", continuous_update=False, style=_STYLE
        ),
    }
    output = widgets.Output()
    box = widgets.VBox([widgets.HBox(list(controls.values())), output])

    def draw() -> Figure:
        return plot_training_step(results[controls["method"].value], controls["step"].value)

    attach_redraw(box, controls, output, draw)
    return box


def capacity_explorer(
    routings: Mapping[str, Tensor], num_experts: int, capacity_factor: float = 1.25
) -> widgets.VBox:
    """Pick a routing and a capacity factor: per-expert load, the capacity line, what is dropped.

    Every routing is checked here (a bad one is named, ``routings[name]``), not when the dropdown
    reaches it."""
    if not isinstance(routings, Mapping) or not routings:
        raise ValueError("routings must be a non-empty dict {name: top_k_index [T, K]}")
    names = list(routings)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r} is not allowed: it must be a positive integer")
    check_routings(routings, num_experts)
    low, high, step = _FACTOR_RANGE
    check_slider_value("capacity_factor", capacity_factor, low, high, step, kind=float)
    controls = {
        "routing": widgets.Dropdown(options=names, value=names[0], description="routing", style=_STYLE),
        "capacity_factor": widgets.FloatSlider(
            value=capacity_factor,
            min=low,
            max=high,
            step=step,
            description="capacity factor",
            continuous_update=False,
            style=_STYLE,
        ),
    }
    output = widgets.Output()
    box = widgets.VBox([widgets.HBox(list(controls.values())), output])

    def draw() -> Figure:
        name = controls["routing"].value
        factor = controls["capacity_factor"].value
        return plot_capacity_drops(routings[name], num_experts, factor, title="")

    attach_redraw(box, controls, output, draw)
    return box
