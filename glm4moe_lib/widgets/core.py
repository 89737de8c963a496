"""What every lesson widget shares: one Output with one figure, redrawn when a control changes."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
from IPython.display import display
from matplotlib.figure import Figure


def check_slider_value(name: str, value, low, high, step, kind=int) -> None:
    """Reject a start value a slider would silently clamp or round: TypeError for a non-number,
    ValueError naming ``name``, the value and the slider's range [low, high] in steps of ``step``."""
    what = "an integer" if kind is int else "a number"
    allowed = f"{what} in [{low}, {high}] in steps of {step}"
    if isinstance(value, bool) or not isinstance(value, (int,) if kind is int else (int, float)):
        raise TypeError(f"{name}={value!r} is not allowed: the slider takes {allowed}")
    if not (low <= value <= high) or abs((value - low) / step - round((value - low) / step)) > 1e-9:
        raise ValueError(f"{name}={value!r} is not allowed: the slider takes {allowed}")


def attach_redraw(
    box: widgets.VBox, controls: dict, output: widgets.Output, draw: Callable[[], Figure]
) -> None:
    """Redraw ``draw()`` into ``output`` whenever a control changes, and draw once now.

    The box then carries ``controls`` (by name), ``output``, ``figure`` (the last one drawn),
    ``redraw_count`` and ``redraw()``, so tests and notebooks can drive it from code.
    """
    box.controls = controls
    box.output = output
    box.figure = None
    box.redraw_count = 0

    def redraw(*_) -> None:
        fig = draw()
        box.figure = fig
        box.redraw_count += 1
        with output:
            output.clear_output(wait=True)
            display(fig)

    box.redraw = redraw
    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
