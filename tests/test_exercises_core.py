"""The exercise machinery: verdicts in plain words, known mistakes recognized, inputs protected."""

import torch

from glm4moe_lib import RouterOutput
from glm4moe_lib.exercises.core import Case, Mistake, check_function, compare_values


def reference(x):
    return x.softmax(-1)


CASES = [Case("3x4", (torch.arange(12.0).view(3, 4),)), Case("1x5", (torch.randn(1, 5),))]
MISTAKES = [
    Mistake("you took the softmax over the tokens (dim 0) instead of the experts.", lambda x: x.softmax(0))
]


def test_correct_function_passes():
    result = check_function("softmax", lambda x: torch.softmax(x, dim=-1), reference, CASES, MISTAKES)
    assert result.passed and result.status == "passed"
    assert repr(result) == "✅ softmax: correct on all 2 cases."


def test_known_mistake_is_named():
    result = check_function("softmax", lambda x: x.softmax(0), reference, CASES, MISTAKES)
    assert not result.passed
    assert "over the tokens (dim 0)" in result.message and "'3x4'" in result.message


def test_unknown_mistake_gets_the_difference():
    result = check_function("softmax", lambda x: x.sigmoid(), reference, CASES, MISTAKES)
    assert "values differ" in result.message and not result


def test_wrong_shape_and_type():
    assert "shape [3]" in check_function("s", lambda x: x.sum(-1), reference, CASES).message
    assert "should return a tensor" in check_function("s", lambda x: 1.0, reference, CASES).message


def test_stub_and_missing_return_are_not_done():
    def stub(x):
        raise NotImplementedError

    for fn in (stub, lambda x: None):
        result = check_function("softmax", fn, reference, CASES)
        assert result.status == "not done" and "not done yet" in result.message


def test_exception_is_reported_in_words():
    result = check_function("softmax", lambda x: x[10], reference, CASES)
    assert "raised IndexError" in result.message


def test_in_place_edits_cannot_fool_the_check():
    def sneaky(x):
        x.zero_()  # edits its input, then returns the reference of the edited tensor
        return x.softmax(-1)

    assert not check_function("softmax", sneaky, reference, CASES)


def test_named_tuples_reach_the_learner_intact():
    routing = RouterOutput(
        torch.zeros(2, 4), torch.rand(2, 4), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long)
    )
    seen = []

    def learner(r):
        seen.append(type(r))
        return r.scores.sum()

    check_function("named", learner, lambda r: r.scores.sum(), [Case("r", (routing,))])
    assert seen == [RouterOutput]


def test_compare_values():
    assert compare_values((torch.ones(2), 3), (torch.ones(2), 3)) is None
    assert "tuple of 2" in compare_values(torch.ones(2), (torch.ones(2), 3))
    assert "integer values differ" in compare_values(torch.tensor([1, 2]), torch.tensor([1, 3]))
    assert compare_values(1.0 + 1e-9, 1.0) is None


def test_nan_in_the_output_is_said_in_words():
    expected = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    got = torch.tensor([[0.5, 0.5], [float("nan"), float("nan")]])  # an empty row divided by its sum
    why = compare_values(got, expected)
    assert "your output contains NaN" in why and "at 2 of 4 positions" in why and "0/0" in why, why
    assert "largest difference" not in why
    inf = compare_values(torch.tensor([1.0, float("inf")]), torch.tensor([1.0, 2.0]))
    assert "contains inf at 1 of 2 positions" in inf, inf
    assert compare_values(got, got.clone()) is None  # NaN where NaN is expected is fine


def test_largest_difference_ignores_matching_infinities():
    """A masked -inf that matches is not a difference: the finite values are compared (not 'nan')."""
    inf = float("inf")
    why = compare_values(torch.tensor([-inf, 1.0]), torch.tensor([-inf, 2.0]))
    assert "largest difference 1)" in why, why
    why = compare_values(torch.tensor([0.0, 1.0]), torch.tensor([-inf, 1.0]))
    assert "at 1 position where NaN or infinite values are expected" in why, why
