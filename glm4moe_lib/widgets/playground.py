"""The classroom playground: one dashboard with large controls for a projector.

Controls (their ``description`` labels in brackets): number of experts [experts], top-K [top-K],
scoring function [scoring], temperature [temperature], the batch's shared direction [input skew],
the batch and router seed [batch seed], balancing method [balancing], its strength (alpha of the
auxiliary loss, or a multiple of the bias step u) [strength] and the number of balancing steps
[steps]; a [reset] button restores the start. Every change re-routes a fixed token batch
(:func:`glm4moe_lib.viz.playground.simulate_playground`) and redraws the routing heatmap, the load
bars and MaxVio (:func:`~glm4moe_lib.viz.playground.draw_playground`) into an image.

    from glm4moe_lib.widgets.playground import Playground
    Playground()          # in a notebook cell: shows the dashboard

``make demo`` opens ``notebooks/playground.ipynb`` as an app with Voilà.
"""

from __future__ import annotations

import html
import io
import math
import time
from typing import Any

import ipywidgets as widgets

from ..viz.core import check_scale
from ..viz.playground import (
    BALANCING,
    DEFAULT_SKEW,
    MAX_EXPERTS,
    MAX_STEPS,
    MAX_TOP_K,
    SHOWN_TOKENS,
    SKEW_RANGE,
    STRENGTH_RANGE,
    TEMPERATURE_RANGE,
    PlaygroundState,
    draw_playground,
    simulate_playground,
)

#: Control name -> description label shown next to it (the browser test finds controls by label).
LABELS = {
    "num_experts": "experts",
    "top_k": "top-K",
    "scoring_func": "scoring",
    "temperature": "temperature",
    "skew": "input skew",
    "seed": "batch seed",
    "balancing": "balancing",
    "strength": "strength",
    "steps": "steps",
}
DEFAULTS: dict[str, Any] = {
    "num_experts": 8,
    "top_k": 2,
    "scoring_func": "sigmoid",
    "temperature": 1.0,
    "skew": DEFAULT_SKEW,
    "seed": 0,
    "balancing": "none",
    "strength": 1.0,
    "steps": 50,
}
MAX_SEED = 99

# Big labels and readouts for the back row of a lecture hall (applies inside .glm-playground only).
_CSS = """<style>
.glm-playground .widget-label, .glm-playground .widget-readout, .glm-playground select,
.glm-playground .widget-dropdown > select { font-size: 22px !important; line-height: 32px; height: 36px; }
.glm-playground .widget-slider, .glm-playground .widget-dropdown { height: 40px; margin-bottom: 6px; }
.glm-playground .glm-readout { font-size: 22px; line-height: 1.4; }
.glm-playground .widget-image { max-width: 100%; height: auto; }
</style>"""


class Playground:
    """The dashboard: ``controls`` (by name), ``image`` (the figure), ``readout``; ``state`` is the
    last :class:`PlaygroundState`. Show it by putting the object last in a cell (or ``.widget``).
    """

    def __init__(self, *, scale: float = 1.5, tokens: int = 256, seed: int = 0, **settings: Any) -> None:
        check_scale(scale)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed={seed!r} is not allowed: it must be an integer in [0, {MAX_SEED}]")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not SHOWN_TOKENS <= tokens <= 4096:
            raise ValueError(
                f"tokens={tokens!r} is not allowed: it must be an integer in [{SHOWN_TOKENS}, 4096]"
            )
        self.scale = scale
        self.tokens = tokens
        self.redraw_seconds = 0.0  # time of the last recompute + redraw
        self.redraws = 0
        big = widgets.Layout(width="470px")
        style = {"description_width": "150px"}
        self.controls: dict[str, widgets.ValueWidget] = {
            "num_experts": widgets.IntSlider(
                value=DEFAULTS["num_experts"], min=2, max=MAX_EXPERTS, step=1,
                description=LABELS["num_experts"], continuous_update=False, layout=big, style=style,
            ),
            "top_k": widgets.IntSlider(
                value=DEFAULTS["top_k"], min=1, max=min(MAX_TOP_K, DEFAULTS["num_experts"]), step=1,
                description=LABELS["top_k"], continuous_update=False, layout=big, style=style,
            ),
            "scoring_func": widgets.Dropdown(
                options=["sigmoid", "softmax"], value=DEFAULTS["scoring_func"],
                description=LABELS["scoring_func"], layout=big, style=style,
            ),
            "temperature": widgets.FloatSlider(
                value=DEFAULTS["temperature"], min=TEMPERATURE_RANGE[0], max=TEMPERATURE_RANGE[1], step=0.1,
                description=LABELS["temperature"], continuous_update=False, readout_format=".1f",
                layout=big, style=style,
            ),
            "skew": widgets.FloatSlider(
                value=DEFAULTS["skew"], min=SKEW_RANGE[0], max=SKEW_RANGE[1], step=0.5,
                description=LABELS["skew"], continuous_update=False, readout_format=".1f",
                layout=big, style=style,
            ),
            "seed": widgets.IntSlider(
                value=seed, min=0, max=MAX_SEED, step=1,
                description=LABELS["seed"], continuous_update=False, layout=big, style=style,
            ),
            "balancing": widgets.Dropdown(
                options=list(BALANCING), value=DEFAULTS["balancing"],
                description=LABELS["balancing"], layout=big, style=style,
            ),
            "strength": widgets.FloatLogSlider(
                value=DEFAULTS["strength"], base=10, min=math.log10(STRENGTH_RANGE[0]),
                max=math.log10(STRENGTH_RANGE[1]), step=0.25, description=LABELS["strength"],
                continuous_update=False, readout_format=".2g", layout=big, style=style,
            ),
            "steps": widgets.IntSlider(
                value=DEFAULTS["steps"], min=0, max=MAX_STEPS, step=10,
                description=LABELS["steps"], continuous_update=False, layout=big, style=style,
            ),
        }  # fmt: skip
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="100%"))
        self.readout = widgets.HTML()
        self.readout.add_class("glm-readout")
        self.reset_button = widgets.Button(description="reset", tooltip="back to the start settings")
        self.reset_button.on_click(lambda _: self.reset())
        self._start = {**DEFAULTS, "seed": seed}
        columns = (
            ("num_experts", "top_k", "scoring_func"),
            ("temperature", "skew", "seed"),
            ("balancing", "strength", "steps"),
        )
        self.widget = widgets.VBox(
            [
                widgets.HTML(_CSS),
                widgets.HBox([widgets.VBox([self.controls[n] for n in names]) for names in columns]),
                widgets.HBox([self.reset_button, self.readout]),
                self.image,
            ]
        )
        self.widget.add_class("glm-playground")
        self._holding = False
        self.state: PlaygroundState
        self._holding = True
        try:
            self._apply(settings)
        finally:
            self._holding = False
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        self.update()
        # The first autograd step of a session is slow (lazy set-up): take it now, not on the
        # first click in front of the class.
        simulate_playground(balancing="switch aux loss", steps=1, tokens=self.tokens, seed=seed)

    # ---- settings ----------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        """The batch and router seed (the [batch seed] control)."""
        return self.controls["seed"].value

    @property
    def settings(self) -> dict[str, Any]:
        """The current control values, by name."""
        return {name: control.value for name, control in self.controls.items()}

    def reset(self) -> PlaygroundState:
        """Every control back to its start value (the defaults, and the constructor's seed); one redraw."""
        return self.set(**self._start)

    def set(self, **settings: Any) -> PlaygroundState:
        """Change several controls at once and redraw once; returns the new state.

        Numbers outside a slider's range are clamped to it (top-K also to the number of experts);
        an unknown name or a choice a dropdown does not offer raises ValueError.
        """
        self._holding = True
        try:
            self._apply(settings)
        finally:
            self._holding = False
        return self.update()

    def _apply(self, settings: dict[str, Any]) -> None:
        unknown = sorted(set(settings) - set(self.controls))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a playground control: use one of {list(self.controls)}")
        order = [n for n in self.controls if n in settings]  # experts before top-K
        for name in order:
            control, value = self.controls[name], settings[name]
            if isinstance(control, widgets.Dropdown):
                if value not in control.options:
                    raise ValueError(f"{name}={value!r} is not allowed: use one of {list(control.options)}")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                    raise ValueError(f"{name}={value!r} is not allowed: it must be a number")
                if isinstance(control, widgets.FloatLogSlider):  # (its min and max are exponents)
                    low, high = control.base**control.min, control.base**control.max
                else:
                    low, high = control.min, control.max
                value = min(max(value, low), high)
                if isinstance(control, widgets.IntSlider):
                    value = int(round(value))
            control.value = value
            if name == "num_experts":
                self._sync_top_k()

    def _sync_top_k(self) -> None:
        top_k = self.controls["top_k"]
        top_k.max = min(MAX_TOP_K, self.controls["num_experts"].value)  # clamps top_k.value too

    def _on_change(self, change: dict[str, Any]) -> None:
        if self._holding:
            return
        self._holding = True
        try:
            if change["owner"] is self.controls["num_experts"]:
                self._sync_top_k()
        finally:
            self._holding = False
        self.update()

    # ---- compute and draw --------------------------------------------------------------------
    def update(self) -> PlaygroundState:
        """Recompute the routing for the current controls and redraw the figure."""
        start = time.perf_counter()
        self.state = simulate_playground(**self.settings, tokens=self.tokens)
        off = self.controls["balancing"].value == "none"  # strength and steps do nothing then: greyed out
        self.controls["strength"].disabled = self.controls["steps"].disabled = off
        fig = draw_playground(self.state, scale=self.scale)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.image.value = buf.getvalue()
        self.redraw_seconds = time.perf_counter() - start
        self.redraws += 1
        self.readout.value = self._readout_html()
        return self.state

    def _readout_html(self) -> str:
        s = self.state
        vio = s.max_vio_history
        change = (
            f" (was {vio[0]:.2f} before {s.steps} steps of {html.escape(s.balancing)}; "
            f"{s.moved:.0%} of the picks moved to experts the router liked less)"
            if s.balancing != "none" and s.steps > 0
            else ""
        )
        return (
            f"<div class='glm-readout'><b>MaxVio {s.max_vio:.2f}</b>{change} &nbsp;·&nbsp; "
            f"{s.tokens} tokens × top-{s.top_k} over {s.num_experts} experts: balanced = "
            f"{s.ideal_load:.0f} picks each, busiest expert {int(s.load.max())}"
            f"<br><small>Temperature changes the weights, not the top-K choice (unless a bias or "
            f"a loss is in play). Redraw {self.redraw_seconds:.2f} s.</small></div>"
        )

    # ---- display -----------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)


def playground(**settings: Any) -> Playground:
    """Build the dashboard (see :class:`Playground`); put it last in a cell to show it."""
    return Playground(**settings)
