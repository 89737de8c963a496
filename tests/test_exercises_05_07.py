"""The lesson 05–07 checks: a correct answer passes, each common mistake gets its plain-words message."""

import math

import pytest
import torch
import torch.nn.functional as F

from glm4moe_lib.exercises import (
    check_balance_loss,
    check_bias_update,
    check_capacity,
    check_combine,
    check_glm4_router,
    check_moe_forward,
)

# ---- lesson 05: combine ------------------------------------------------------------------------------


def combine(y_sorted, token_ids, order, w):
    out = torch.zeros(w.shape[0], y_sorted.shape[1])
    return out.index_add_(0, token_ids, y_sorted * w.reshape(-1)[order].unsqueeze(-1))


def combine_loop(y_sorted, token_ids, order, w):  # a slow but correct learner answer
    flat_w = w.reshape(-1)
    out = torch.zeros(w.shape[0], y_sorted.shape[1])
    for j in range(len(order)):
        out[token_ids[j]] = out[token_ids[j]] + flat_w[order[j]] * y_sorted[j]
    return out


def combine_no_weights(y_sorted, token_ids, order, w):
    return torch.zeros(w.shape[0], y_sorted.shape[1]).index_add_(0, token_ids, y_sorted)


def combine_unsorted_weights(y_sorted, token_ids, order, w):
    return torch.zeros(w.shape[0], y_sorted.shape[1]).index_add_(0, token_ids, y_sorted * w.reshape(-1, 1))


def combine_assign(y_sorted, token_ids, order, w):
    out = torch.zeros(w.shape[0], y_sorted.shape[1])
    out[token_ids] += y_sorted * w.reshape(-1)[order].unsqueeze(-1)
    return out


def combine_mean(y_sorted, token_ids, order, w):
    return combine_no_weights(y_sorted, token_ids, order, w) / w.shape[1]


def combine_todo(y_sorted, token_ids, order, w):
    raise NotImplementedError("Your turn")


@pytest.mark.parametrize("fn", [combine, combine_loop])
def test_combine_correct(fn):
    result = check_combine(fn)
    assert result.passed and result.status == "passed", result.message


@pytest.mark.parametrize(
    "fn, words",
    [
        (combine_no_weights, "without their routing weights"),
        (combine_unsorted_weights, "rows are sorted by expert"),
        (combine_assign, "index_add_"),
        (combine_mean, "averaged"),
    ],
)
def test_combine_mistakes(fn, words):
    result = check_combine(fn)
    assert not result.passed
    assert words in result.message, result.message


def test_combine_not_done():
    result = check_combine(combine_todo)
    assert result.status == "not done" and "not done yet" in result.message


# ---- lesson 05: capacity -----------------------------------------------------------------------------


def capacity(idx, e, f):
    t, k = idx.shape
    cap = math.ceil(f * t * k / e)
    load = torch.bincount(idx.flatten(), minlength=e)
    return cap, int(torch.clamp(load - cap, min=0).sum())


def capacity_tensor(idx, e, f):  # returns tensors: accepted too
    cap, dropped = capacity(idx, e, f)
    return torch.tensor(cap), torch.tensor(dropped)


def capacity_floor(idx, e, f):
    t, k = idx.shape
    cap = int(f * t * k / e)
    load = torch.bincount(idx.flatten(), minlength=e)
    return cap, int(torch.clamp(load - cap, min=0).sum())


def capacity_no_k(idx, e, f):
    cap = math.ceil(f * idx.shape[0] / e)
    load = torch.bincount(idx.flatten(), minlength=e)
    return cap, int(torch.clamp(load - cap, min=0).sum())


def capacity_no_clamp(idx, e, f):
    t, k = idx.shape
    cap = math.ceil(f * t * k / e)
    return cap, int((torch.bincount(idx.flatten(), minlength=e) - cap).sum())


def capacity_experts(idx, e, f):
    t, k = idx.shape
    cap = math.ceil(f * t * k / e)
    return cap, int((torch.bincount(idx.flatten(), minlength=e) > cap).sum())


@pytest.mark.parametrize("fn", [capacity, capacity_tensor])
def test_capacity_correct(fn):
    result = check_capacity(fn)
    assert result.passed, result.message


@pytest.mark.parametrize(
    "fn, words",
    [
        (capacity_floor, "not rounded up"),
        (capacity_no_k, "forgot top_k"),
        (capacity_no_clamp, "clamp"),
        (capacity_experts, "counted the experts"),
    ],
)
def test_capacity_mistakes(fn, words):
    result = check_capacity(fn)
    assert not result.passed
    assert words in result.message, result.message


# ---- lesson 06: balance loss -------------------------------------------------------------------------


def balance_loss(logits, k):
    t, e = logits.shape
    p = F.softmax(logits, dim=-1)
    picks = F.one_hot(p.topk(k, dim=-1).indices, e).sum(1).float()  # [T, E]
    return e * (picks.mean(0) * p.mean(0)).sum()


def balance_loss_float(logits, k):
    return balance_loss(logits, k).item()


def balance_loss_detached(logits, k):
    return balance_loss(logits, k).detach()


def balance_loss_rebuilt(logits, k):
    return torch.tensor(balance_loss(logits, k).item(), requires_grad=True)


def balance_loss_grad_through_f(logits, k):
    """The right value, but the gradient also flows through a soft f (a straight-through count)."""
    t, e = logits.shape
    p = F.softmax(logits, dim=-1)
    hard = F.one_hot(p.topk(k, dim=-1).indices, e).sum(1).float()
    soft = p * k
    f = (hard - soft).detach() + soft  # value of the hard counts, gradient of the soft ones
    return e * (f.mean(0) * p.mean(0)).sum()


def balance_wrong_dim(logits, k):
    t, e = logits.shape
    p = F.softmax(logits, dim=0)
    picks = F.one_hot(logits.topk(k, dim=-1).indices, e).sum(1).float()
    return e * (picks.mean(0) * p.mean(0)).sum()


def balance_top1(logits, k):
    t, e = logits.shape
    p = F.softmax(logits, dim=-1)
    f = torch.bincount(p.argmax(-1), minlength=e).float() / t
    return e * (f * p.mean(0)).sum()


def balance_per_pick(logits, k):
    return balance_loss(logits, k) / k


def balance_no_e(logits, k):
    return balance_loss(logits, k) / logits.shape[1]


def balance_soft_f(logits, k):
    p = F.softmax(logits, dim=-1)
    return logits.shape[1] * (p.mean(0) * p.mean(0)).sum()


def test_balance_loss_correct():
    result = check_balance_loss(balance_loss)
    assert result.passed, result.message


@pytest.mark.parametrize(
    "off", [torch.no_grad, lambda: torch.set_grad_enabled(False)], ids=["no_grad", "set_off"]
)
def test_balance_loss_check_works_with_gradients_turned_off(off):
    """The lessons turn gradients off globally: a correct answer still passes, a detached one still fails."""
    with off():
        assert check_balance_loss(balance_loss).passed
        assert "carries no gradient" in check_balance_loss(balance_loss_detached).message
        assert not torch.is_grad_enabled()  # the caller's setting is left as it was


@pytest.mark.parametrize(
    "fn, words",
    [
        (balance_loss_float, "carries no gradient"),
        (balance_loss_detached, "carries no gradient"),
        (balance_loss_rebuilt, "does not depend on the router logits"),
        (balance_loss_grad_through_f, "its gradient with respect to the logits is not"),
    ],
)
def test_balance_loss_without_the_right_gradient_fails(fn, words):
    """The value alone is not enough: training adds this loss to the task loss for its gradient."""
    result = check_balance_loss(fn)
    assert not result.passed and result.status == "failed"
    assert "the value is right" in result.message and words in result.message, result.message


@pytest.mark.parametrize(
    "fn, words",
    [
        (balance_wrong_dim, "over the tokens (dim=0)"),
        (balance_top1, "top-1 choice"),
        (balance_per_pick, "divided the counts by T·K"),
        (balance_no_e, "forgot the factor E"),
        (balance_soft_f, "probabilities as f"),
    ],
)
def test_balance_loss_mistakes(fn, words):
    result = check_balance_loss(fn)
    assert not result.passed
    assert words in result.message, result.message


def test_balance_loss_wrong_shape():
    result = check_balance_loss(lambda logits, k: torch.zeros(3))
    assert not result.passed and "one number" in result.message


# ---- lesson 06: bias update --------------------------------------------------------------------------


def bias_update(bias, load, u):
    bias += u * torch.sign(load.mean() - load)
    return bias


def bias_update_functional(bias, load, u):
    return bias + u * (load < load.mean()).float() - u * (load > load.mean()).float()


def bias_sign_flipped(bias, load, u):
    return bias + u * torch.sign(load - load.mean())


def bias_proportional(bias, load, u):
    return bias + u * (load.mean() - load)


def bias_no_rate(bias, load, u):
    return bias + torch.sign(load.mean() - load)


def bias_delta_only(bias, load, u):
    return u * torch.sign(load.mean() - load)


def bias_two_way(bias, load, u):
    return bias + torch.where(load > load.mean(), -u, u)


@pytest.mark.parametrize("fn", [bias_update, bias_update_functional])
def test_bias_update_correct(fn):
    result = check_bias_update(fn)
    assert result.passed, result.message


@pytest.mark.parametrize(
    "fn, words",
    [
        (bias_sign_flipped, "sign is flipped"),
        (bias_proportional, "in proportion"),
        (bias_no_rate, "forgot the update rate"),
        (bias_delta_only, "only the change"),
        (bias_two_way, "sign(0) = 0"),
    ],
)
def test_bias_update_mistakes(fn, words):
    result = check_bias_update(fn)
    assert not result.passed
    assert words in result.message, result.message


# ---- lesson 07: router -------------------------------------------------------------------------------


def glm4_route(logits, bias, k, n_group, topk_group, norm, scale):
    scores = torch.sigmoid(logits.float())
    choice = scores + bias
    t, e = choice.shape
    if n_group > 1:
        group_scores = choice.view(t, n_group, -1).topk(2, dim=-1).values.sum(-1)
        best = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros(t, n_group, dtype=torch.bool).scatter(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), -math.inf)
    idx = choice.topk(k, dim=-1, sorted=False).indices
    w = scores.gather(1, idx)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return w * scale, idx


def glm4_route_reversed(*args):
    w, idx = glm4_route(*args)
    return w.flip(-1), idx.flip(-1)


def route_bias_in_weights(logits, bias, k, n_group, topk_group, norm, scale):
    w, idx = glm4_route(logits, bias, k, n_group, topk_group, False, 1.0)
    w = w + bias[idx]
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return w * scale, idx


def route_softmax(logits, bias, k, n_group, topk_group, norm, scale):
    fake = torch.logit(logits.softmax(-1))  # sigmoid(fake) == softmax(logits)
    return glm4_route(fake, bias, k, n_group, topk_group, norm, scale)


def route_no_groups(logits, bias, k, n_group, topk_group, norm, scale):
    return glm4_route(logits, bias, k, 1, 1, norm, scale)


def route_scale_first(logits, bias, k, n_group, topk_group, norm, scale):
    w, idx = glm4_route(logits, bias, k, n_group, topk_group, False, scale)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return w, idx


def route_no_bias(logits, bias, k, n_group, topk_group, norm, scale):
    return glm4_route(logits, torch.zeros_like(bias), k, n_group, topk_group, norm, scale)


@pytest.mark.parametrize("fn", [glm4_route, glm4_route_reversed])
def test_router_correct(fn):
    result = check_glm4_router(fn)
    assert result.passed, result.message


@pytest.mark.parametrize(
    "fn, words",
    [
        (route_bias_in_weights, "weights include the bias"),
        (route_softmax, "softmax"),
        (route_no_groups, "ignored the groups"),
        (route_scale_first, "scaled before renormalizing"),
        (route_no_bias, "ignored the bias"),
    ],
)
def test_router_mistakes(fn, words):
    result = check_glm4_router(fn)
    assert not result.passed
    assert words in result.message, result.message


def route_no_scale(logits, bias, k, n_group, topk_group, norm, scale):
    return glm4_route(logits, bias, k, n_group, topk_group, norm, 1.0)


@pytest.mark.parametrize("fn", [route_no_scale, route_scale_first], ids=["never scaled", "scaled first"])
def test_router_missing_scale_names_both_causes(fn):
    """Never scaling and scaling before the renormalization give the same numbers: one message, both causes."""
    message = check_glm4_router(fn).message
    assert "never multiplied" in message and "scaled before renormalizing" in message, message


def route_always_normalizes(logits, bias, k, n_group, topk_group, norm, scale):
    return glm4_route(logits, bias, k, n_group, topk_group, True, scale)


def test_router_normalizing_when_norm_topk_prob_is_false():
    result = check_glm4_router(route_always_normalizes)
    assert not result.passed
    assert "norm_topk_prob is False here: do not divide by the sum" in result.message, result.message


def test_router_float_indices_are_named_not_blamed_on_the_weights():
    result = check_glm4_router(lambda *a: (glm4_route(*a)[0], glm4_route(*a)[1].float()))
    assert "indices should be integers (torch.topk(...).indices), not floats" in result.message, (
        result.message
    )
    swapped = check_glm4_router(lambda *a: glm4_route(*a)[::-1])
    assert "in the order (weights, indices)" in swapped.message, swapped.message


# ---- lesson 07: the layer ----------------------------------------------------------------------------


def moe_forward(moe, x):
    routing = moe.gate(x)
    routed = moe.experts(x, routing.topk_indices, routing.topk_weights)
    return routed + moe.shared_experts(x)


def moe_no_shared(moe, x):
    routing = moe.gate(x)
    return moe.experts(x, routing.topk_indices, routing.topk_weights)


def moe_unweighted(moe, x):
    routing = moe.gate(x)
    ones = torch.ones_like(routing.topk_weights)
    return moe.experts(x, routing.topk_indices, ones) + moe.shared_experts(x)


def test_moe_forward_correct():
    result = check_moe_forward(moe_forward)
    assert result.passed, result.message


def test_moe_forward_leaves_the_global_rng_alone():
    """The check builds its layers from a fixed seed without resetting the learner's RNG stream."""
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    assert check_moe_forward(moe_forward).passed
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    torch.manual_seed(999)  # another stream: the check still builds the same cases
    assert check_moe_forward(moe_forward).passed


@pytest.mark.parametrize(
    "call", [lambda moe, x: moe(x), lambda moe, x: moe.forward(x)], ids=["call", "forward"]
)
def test_moe_forward_calling_the_finished_layer_is_refused(call):
    """moe(x) would pass without doing the exercise: the learner's layer refuses it, saying why."""
    result = check_moe_forward(call)
    assert not result.passed
    assert "moe(x) runs the library's finished layer" in result.message and "moe.gate(x)" in result.message


@pytest.mark.parametrize(
    "fn, words",
    [(moe_no_shared, "left out the shared expert"), (moe_unweighted, "weight 1")],
)
def test_moe_forward_mistakes(fn, words):
    result = check_moe_forward(fn)
    assert not result.passed
    assert words in result.message, result.message


def test_not_a_function():
    assert not check_bias_update(3).passed


def test_capacity_names_round_as_not_rounding_up():
    from glm4moe_lib.exercises import check_capacity

    def rounded(idx, e, f):
        t, k = idx.shape
        cap = round(f * t * k / e)
        load = torch.bincount(idx.reshape(-1), minlength=e)
        return cap, int((load - cap).clamp_min(0).sum())

    r = check_capacity(rounded)
    assert not r.passed and "not rounded up" in r.message and "round()" in r.message
