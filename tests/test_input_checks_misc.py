"""Bad input gets a clear error, and exercise checks explain odd return values in plain words.

Covers the exercise machinery (a tensor, array, string, list or bool where a number is expected),
the lesson 05 figures' expert ids, the expert-parallel helpers and layer, and the balancing lab.
"""

import numpy as np
import pytest
import torch

from glm4moe_lib.config import MoEConfig
from glm4moe_lib.exercises import (
    check_active_params,
    check_balance_loss,
    check_capacity,
    check_dispatch_bytes,
    check_ffn_params,
    check_layer_bytes,
    check_layer_flops,
    check_layer_params,
)
from glm4moe_lib.exercises.core import Case, check_function, compare_values
from glm4moe_lib.lab import make_lab_moe
from glm4moe_lib.parallel import (
    EPMoE,
    all_to_all,
    check_world_size,
    expert_owner,
    send_counts,
    traffic_matrix,
)
from glm4moe_lib.viz import dispatch as vd

# ---- exercise checks: one number expected ------------------------------------------------------------

NUMBER_CHECKS = [check_layer_flops, check_layer_bytes, check_dispatch_bytes, check_balance_loss]
PAIR_CHECKS = [check_layer_params, check_ffn_params, check_active_params, check_capacity]


def _ret(value):
    return lambda *args, **kwargs: value


@pytest.mark.parametrize("check", NUMBER_CHECKS, ids=lambda c: c.__name__)
def test_tensor_of_many_values_is_explained(check):
    result = check(_ret(torch.ones(3)))
    assert not result.passed and result.status == "failed"
    assert "shape [3]" in result.message and "one number" in result.message, result.message


@pytest.mark.parametrize("check", NUMBER_CHECKS, ids=lambda c: c.__name__)
def test_string_is_not_read_as_a_number(check):
    result = check(_ret("1.0"))
    assert not result.passed
    assert "string '1.0'" in result.message and "not text" in result.message, result.message
    assert "it returned 1," not in result.message


@pytest.mark.parametrize(
    "value, words",
    [
        (np.ones(3), "ndarray"),
        ([1, 2], "list"),
        (True, "bool"),
        ((torch.ones(2), torch.ones(2)), "a tuple"),
    ],
    ids=["numpy array", "list", "bool", "tuple"],
)
@pytest.mark.parametrize("check", [check_layer_flops, check_balance_loss], ids=lambda c: c.__name__)
def test_other_non_numbers_are_explained(check, value, words):
    result = check(_ret(value))
    assert not result.passed and words in result.message, result.message


@pytest.mark.parametrize("check", PAIR_CHECKS, ids=lambda c: c.__name__)
def test_pair_of_tensors_is_explained(check):
    result = check(_ret((torch.ones(3), torch.ones(3))))
    assert not result.passed
    assert "returned value #1" in result.message and "shape [3]" in result.message, result.message


@pytest.mark.parametrize("check", PAIR_CHECKS, ids=lambda c: c.__name__)
def test_pair_of_arrays_or_strings_is_explained(check):
    assert "ndarray" in check(_ret((np.ones(3), np.ones(3)))).message
    message = check(_ret(("1", "2"))).message
    assert "string '1'" in message, message


@pytest.mark.parametrize("check", PAIR_CHECKS, ids=lambda c: c.__name__)
def test_list_instead_of_tuple_and_none(check):
    assert "not a list" in check(_ret([1, 2])).message
    result = check(_ret(None))
    assert not result.passed and result.status == "not done" and "return" in result.message


def test_capacity_rejects_strings_and_fractions():
    assert "string '2'" in check_capacity(_ret(("2", "0"))).message
    message = check_capacity(_ret((2.5, 0))).message
    assert "it returned 2.5" in message, message


def test_one_element_tensors_and_numpy_numbers_still_pass():
    exact = check_function("n", _ret(torch.tensor(6)), lambda: 6, [Case("c")])
    assert exact.passed
    assert check_function("n", _ret(np.float64(6.0)), lambda: 6.0, [Case("c")]).passed
    assert check_function("n", _ret((torch.tensor([2]), 3.0)), lambda: (2, 3), [Case("c")]).passed
    assert "it returned 7" in check_function("n", _ret(torch.tensor(7)), lambda: 6, [Case("c")]).message


def test_compare_values_never_raises_on_odd_values():
    assert "3 values" in compare_values(torch.ones(3), 5)
    assert "3 values" in compare_values(np.ones(3), 5.0)
    assert compare_values(np.ones(3), "abc") is not None  # an array compared element by element


def test_a_compare_that_raises_becomes_a_verdict():
    def broken(got, expected):
        raise RuntimeError("boom")

    result = check_function("n", _ret(1), lambda: 1, [Case("c")], compare=broken)
    assert not result.passed and "it returned int 1" in result.message


# ---- viz/dispatch: expert ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda idx: vd.capacity_drops(idx, 8, 1.0),
        lambda idx: vd.dropped_fraction(idx, 8, [1.0]),
        lambda idx: vd.plot_permutation(idx, 8),
        lambda idx: vd.plot_capacity_drops(idx, 8, 1.0),
    ],
    ids=["capacity_drops", "dropped_fraction", "plot_permutation", "plot_capacity_drops"],
)
def test_viz_dispatch_expert_ids_checked(fn):
    with pytest.raises(ValueError, match=r"top_k_index holds expert ids from 8 to 11: .*\[0, 8\)"):
        fn(torch.tensor([[8, 9], [10, 11]]))
    with pytest.raises(ValueError, match=r"top_k_index holds expert ids from -1 to 0"):
        fn(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="top_k_index has dtype torch.float32"):
        fn(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(TypeError, match="top_k_index is a list"):
        fn([[0, 1]])


def test_viz_dispatch_other_inputs():
    with pytest.raises(ValueError, match="no \\(token, slot\\) pairs"):
        vd.dropped_fraction(torch.zeros(0, 2, dtype=torch.long), 8, [1.0])
    with pytest.raises(ValueError, match=r"top_k_weights has shape \(3,\)"):
        vd.plot_permutation(torch.tensor([[0, 1]]), 8, torch.ones(3))
    assert vd.capacity_drops(torch.tensor([[0, 1], [0, 7]]), 8, 1.0) == (1, 1)


# ---- parallel ----------------------------------------------------------------------------------------------


def test_world_size_needs_positive_integers():
    with pytest.raises(ValueError, match="num_experts=0 .*positive integer"):
        check_world_size(0, 1)
    with pytest.raises(ValueError, match="num_experts=-8 .*positive integer"):
        check_world_size(-8, 2)
    with pytest.raises(ValueError, match="num_experts=8.0"):
        check_world_size(8.0, 2)
    assert check_world_size(8, 2) == 4


def test_owner_and_counts_check_expert_ids():
    with pytest.raises(ValueError, match=r"topk_indices holds expert ids from 8 to 9: .*\[0, 8\)"):
        send_counts(torch.tensor([[8, 9]]), 8, 2)
    with pytest.raises(ValueError, match=r"expert holds expert ids from -1 to 8"):
        expert_owner(torch.tensor([8, -1]), 8, 2)
    with pytest.raises(ValueError, match="topk_indices has dtype torch.float32"):
        send_counts(torch.tensor([[0.0, 1.0]]), 8, 2)
    with pytest.raises(ValueError, match=r"topk_indices_per_rank\[1\] holds expert ids from 1 to 9"):
        traffic_matrix([torch.tensor([[1, 7]]), torch.tensor([[1, 9]])], 8, 2)
    assert send_counts(torch.tensor([[1, 7]]), 8, 2).tolist() == [1, 1]
    assert expert_owner(torch.tensor([0, 3, 4, 7]), 8, 2).tolist() == [0, 0, 1, 1]


def test_all_to_all_splits_checked_without_process_group():
    x = torch.ones(4, 2)
    with pytest.raises(ValueError, match=r"input_splits=\[3\] adds up to 3 rows, but x has 4"):
        all_to_all(x, [4], [3])
    with pytest.raises(ValueError, match=r"output_splits=\[3\] .*must be equal"):
        all_to_all(x, [3], [4])
    with pytest.raises(ValueError, match=r"output_splits=\[2, 2\] .*list of 1 non-negative ints"):
        all_to_all(x, [2, 2], [2, 2])
    with pytest.raises(ValueError, match=r"input_splits=\[5, -1\]"):
        all_to_all(x, [4], [5, -1])
    with pytest.raises(TypeError, match="x is a list"):
        all_to_all([1.0, 2.0], [2], [2])
    assert torch.equal(all_to_all(x, [4], [4]), x)


CFG = MoEConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2)


def test_epmoe_checks_its_input():
    ep = EPMoE(CFG)
    with pytest.raises(ValueError, match="hidden_states has dtype torch.float64 .*torch.float32"):
        ep(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="hidden_states has dtype torch.int64: a floating-point"):
        ep(torch.ones(3, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor, got list"):
        ep([[0.0] * 16])
    with pytest.raises(ValueError, match="hidden_size=16"):
        ep(torch.randn(3, 15))
    assert ep(torch.randn(2, 3, 16)).shape == (2, 3, 16)


# ---- lab ------------------------------------------------------------------------------------------------------


def test_lab_offset_checked():
    with pytest.raises(ValueError, match="offset is all zeros"):
        make_lab_moe(offset=torch.zeros(16))
    with pytest.raises(ValueError, match=r"offset has shape \(15,\): expected \[hidden_size\] = \[16\]"):
        make_lab_moe(offset=torch.ones(15))
    with pytest.raises(TypeError, match="offset has dtype torch.int64"):
        make_lab_moe(offset=torch.ones(16, dtype=torch.long))
    with pytest.raises(ValueError, match="offset holds NaN"):
        make_lab_moe(offset=torch.full((16,), float("nan")))
    with pytest.raises(TypeError, match="offset is a list"):
        make_lab_moe(offset=[1.0] * 16)
    with pytest.raises(ValueError, match="skew=nan"):
        make_lab_moe(skew=float("nan"))
    assert not make_lab_moe(offset=torch.ones(16)).gate.weight.isnan().any()
    assert not make_lab_moe(offset=torch.zeros(16), skew=0).gate.weight.isnan().any()
