"""Lesson 10's checks: the reference passes, each common mistake is named, stubs are "not done"."""

import pytest
import torch

from glm4moe_lib.bench import layer_bytes, layer_flops
from glm4moe_lib.exercises import check_layer_bytes, check_layer_flops


def test_layer_flops_matches_the_timed_gemms():
    from glm4moe_lib import PRESETS
    from glm4moe_lib.bench import limit_steps

    for mode in ("forward", "fwd+bwd"):
        *_, flops, nbytes = limit_steps(PRESETS["tiny"], 5, 3, mode, "cpu", torch.float32)
        assert flops == layer_flops(PRESETS["tiny"], 5, backward=mode != "forward")
        assert nbytes == layer_bytes(PRESETS["tiny"], 3, 4, backward=mode != "forward")


def test_references_pass():
    assert check_layer_flops(layer_flops).passed
    assert check_layer_bytes(layer_bytes).passed


@pytest.mark.parametrize(
    "wrong, words",
    [
        (lambda c, t: layer_flops(c, t) // 2, "multiply-adds"),
        (
            lambda c, t: layer_flops(
                c.replace(num_experts_per_tok=c.n_routed_experts, n_group=1, topk_group=1), t
            ),
            "all E routed experts",
        ),
        (lambda c, t: layer_flops(c.replace(n_shared_experts=0), t), "shared expert"),
        (lambda c, t: layer_flops(c, t) - 2 * t * c.hidden_size * c.n_routed_experts, "router"),
    ],
)
def test_flops_mistakes_are_named(wrong, words):
    result = check_layer_flops(wrong)
    assert not result.passed and words in repr(result), repr(result)


@pytest.mark.parametrize(
    "wrong, words",
    [
        (lambda c, touched, b: layer_bytes(c, c.n_routed_experts, b), "only the touched ones"),
        (lambda c, touched, b: layer_bytes(c, touched, 1), "elem_size"),
        (lambda c, touched, b: layer_bytes(c, touched, b) - c.n_routed_experts * c.hidden_size * b, "router"),
    ],
)
def test_bytes_mistakes_are_named(wrong, words):
    result = check_layer_bytes(wrong)
    assert not result.passed and words in repr(result), repr(result)


def test_stub_is_not_done_and_an_unknown_error_still_fails():
    def stub(*args):
        raise NotImplementedError

    assert check_layer_flops(stub).status == "not done"
    off_by_one = check_layer_bytes(lambda c, touched, b: layer_bytes(c, touched, b) + 1)
    assert not off_by_one.passed and off_by_one.status == "failed"
