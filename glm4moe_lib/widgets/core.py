"""What every lesson widget shares: one Output with one figure, redrawn when a control changes."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
from IPython.display import display
from matplotlib.figure import Figure


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
