"""Bad input to the training and diagram figures gets a clear error before any figure is made."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from glm4moe_lib.viz.routing import plot_decoder_stack, plot_moe_diagram
from glm4moe_lib.viz.training import plot_corpus_stats, plot_domain_losses, plot_max_vio


def _metrics(domains, first=0):
    return {
        "train": [
            {"step": 1, "loss": 2.0, "max_vio": [0.5, 0.4]},
            {"step": 2, "loss": 1.9, "max_vio": [0.4, 0.3]},
        ],
        "eval": [{"step": 2, "val_loss": 1.8, "val_loss_per_domain": {d: 1.8 for d in domains}}],
        "model_config": {"first_k_dense_replace": first},
    }


def _raises(exc, match, fn, *args, **kwargs):
    before = plt.get_fignums()
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert plt.get_fignums() == before  # no figure left open


def test_domain_losses_want_runs_with_one_set_of_domains():
    _raises(
        ValueError,
        "must share their domains",
        plot_domain_losses,
        {"a": _metrics(["prose", "code"]), "b": _metrics(["prose", "math"])},
    )
    plot_domain_losses({"a": _metrics(["prose", "code"]), "b": _metrics(["prose", "code"])})


def test_max_vio_wants_the_model_config():
    m = _metrics(["prose"])
    del m["model_config"]
    _raises(ValueError, r"no model_config\['first_k_dense_replace'\]", plot_max_vio, m)
    plot_max_vio(_metrics(["prose"], first=1))


def test_corpus_stats_want_texts():
    _raises(TypeError, r"texts\['code'\] is a int", plot_corpus_stats, {"prose": "ab c", "code": 5})
    _raises(ValueError, "non-empty dict", plot_corpus_stats, {})
    plot_corpus_stats({"prose": "ab c", "code": "x = 1\n"})


@pytest.mark.parametrize("bad, exc", [("8", TypeError), (8.0, TypeError), (1, ValueError), (17, ValueError)])
def test_moe_diagram_expert_count(bad, exc):
    _raises(exc, "num_experts=", plot_moe_diagram, bad)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((4.0, 1), {}, TypeError, "num_hidden_layers=4.0"),
        ((-2, 0), {}, ValueError, "num_hidden_layers=-2"),
        ((4, 5), {}, ValueError, "first_k_dense_replace=5"),
        ((4, 1), {"num_mtp_layers": -1}, ValueError, "num_mtp_layers=-1"),
    ],
)
def test_decoder_stack_counts(args, kwargs, exc, match):
    _raises(exc, match, plot_decoder_stack, *args, **kwargs)


def test_domain_losses_take_the_same_domains_in_another_order():
    fig = plot_domain_losses({"a": _metrics(["prose", "code"]), "b": _metrics(["code", "prose"])})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["prose", "code"]  # the first run's order


def test_char_classes_want_a_str():
    from glm4moe_lib.viz.training import char_classes

    with pytest.raises(TypeError, match="text is a bytes"):
        char_classes(b"ab c")
    assert char_classes("a1 \n.") == dict.fromkeys(
        ("letters", "digits", "spaces", "newlines", "punctuation"), 0.2
    )


@pytest.mark.parametrize("bad", [(1.5,), (1, 2.0), "15", 3, (True, 2)])
def test_moe_diagram_wants_integer_expert_ids(bad):
    _raises(TypeError, "chosen=", plot_moe_diagram, 8, bad)


def test_moe_diagram_takes_numpy_and_tensor_ids():
    import numpy as np
    import torch

    for chosen in ((1, 5), np.array([1, 5]), torch.tensor([1, 5])):
        texts = [t.get_text() for t in plot_moe_diagram(8, chosen, (0.6, 0.4)).axes[0].texts]
        assert "w=0.60" in texts and "w=0.40" in texts
