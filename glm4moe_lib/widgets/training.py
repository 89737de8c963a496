"""Interactive control for lesson 08: per-token routing of a trained model, as coloured text.

``routing_explorer(model, texts)`` is an ``ipywidgets.VBox`` with two dropdowns (MoE layer, text)
and an ``HTML`` view: every byte of the chosen text coloured by the expert its token was sent to
first in the chosen layer (``viz.training.routing_html``). The routing of every text is computed
once, up front, so changing a control only redraws. The box carries ``controls``, ``view``,
``redraw_count`` and ``redraw()`` for tests and for driving it from code; its static twin is
``viz.training.plot_routing_text`` on the same default (first layer, first text).
"""

from __future__ import annotations

from collections.abc import Mapping

import ipywidgets as widgets

from ..model import GLMMoEModel
from ..train import route_text
from ..viz.training import routing_html

__all__ = ["first_choice_experts", "routing_explorer"]

_STYLE = {"description_width": "initial"}


def first_choice_experts(model: GLMMoEModel, text: str) -> tuple[list[str], dict[int, list[int]]]:
    """Printable tokens of ``text`` and, per MoE layer index, each token's first-choice expert.

    The first choice is the expert with the highest routing weight among the token's top-k.
    """
    tokens, routing = route_text(model, text)
    firsts: dict[int, list[int]] = {}
    for i, r in enumerate(routing):
        if r is None:
            continue
        best_slot = r.topk_weights.argmax(-1, keepdim=True)  # [T, 1]
        firsts[i] = r.topk_indices.gather(1, best_slot).squeeze(1).tolist()
    return tokens, firsts


def routing_explorer(
    model: GLMMoEModel, texts: Mapping[str, str], layer: int | None = None, text: str | None = None
) -> widgets.VBox:
    """Pick a MoE layer and a text; see each token coloured by its first-choice expert."""
    if not isinstance(model, GLMMoEModel):
        raise TypeError(f"model={type(model).__name__} is not allowed: pass a GLMMoEModel")
    if not isinstance(texts, Mapping) or not texts:
        raise ValueError("texts must be a non-empty dict {label: text}")
    for label, t in texts.items():
        if not isinstance(t, str) or not t:
            raise TypeError(
                f"texts[{label!r}]={t!r:.40} is not allowed: every text must be a non-empty string"
            )
    routed = {label: first_choice_experts(model, t) for label, t in texts.items()}
    layers = sorted(next(iter(routed.values()))[1])
    if not layers:
        raise ValueError("model has no MoE layers (first_k_dense_replace == num_hidden_layers)")
    layer = layers[0] if layer is None else layer
    if layer not in layers:
        raise ValueError(f"layer={layer!r} is not allowed: the MoE layers are {layers}")
    labels = list(texts)
    text = labels[0] if text is None else text
    if text not in texts:
        raise ValueError(f"text={text!r} is not allowed: use one of {labels}")
    n_experts = model.config.n_routed_experts

    layer_dd = widgets.Dropdown(options=layers, value=layer, description="MoE layer", style=_STYLE)
    text_dd = widgets.Dropdown(options=labels, value=text, description="text", style=_STYLE)
    view = widgets.HTML()
    box = widgets.VBox([widgets.HBox([layer_dd, text_dd]), view])
    box.controls = {"layer": layer_dd, "text": text_dd}
    box.view = view
    box.redraw_count = 0

    def redraw(*_) -> None:
        tokens, firsts = routed[text_dd.value]
        view.value = routing_html(
            tokens,
            firsts[layer_dd.value],
            n_experts,
            title=f"{text_dd.value}: first-choice expert of each byte in layer {layer_dd.value}",
        )
        box.redraw_count += 1

    box.redraw = redraw
    layer_dd.observe(redraw, names="value")
    text_dd.observe(redraw, names="value")
    redraw()
    return box
