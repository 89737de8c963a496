"""The lesson 01–04 checks: a correct answer passes, each common mistake gets its plain-words message."""

import pytest
import torch
import torch.nn.functional as F

from glm4moe_lib.exercises import (
    check_active_params,
    check_expert_load,
    check_ffn_params,
    check_fused_expert,
    check_layer_params,
    check_sigmoid_router,
    check_swiglu,
    check_topk_softmax_router,
)

# ---- correct answers, written as a learner would ---------------------------------------------------


def active_params(e, k, h, i):
    return e * h + e * 3 * h * i, e * h + k * 3 * h * i


def expert_load(idx, e):
    counts = torch.zeros(e, dtype=torch.long)
    for x in idx.reshape(-1).tolist():
        counts[x] += 1
    return counts


def layer_params(c):
    h, i, e, k = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok
    shared = 3 * h * i * c.n_shared_experts
    return e * h + e * 3 * h * i + shared, e * h + k * 3 * h * i + shared


def ffn_params(a):
    dense = 3 * a.moe.hidden_size * a.intermediate_size
    t, act = layer_params(a.moe)
    n = a.num_hidden_layers - a.first_k_dense_replace
    return a.first_k_dense_replace * dense + n * t, a.first_k_dense_replace * dense + n * act


def topk_softmax(logits, k):
    w, i = logits.softmax(-1).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), i


def topk_softmax_reversed(logits, k):  # same experts in ascending order: must also pass
    w, i = topk_softmax(logits, k)
    return w.flip(-1), i.flip(-1)


def sigmoid_router(logits, bias, k, s):
    scores = logits.sigmoid()
    idx = (scores + bias).topk(k, dim=-1).indices
    w = scores.gather(-1, idx)
    return w / w.sum(-1, keepdim=True) * s, idx


def swiglu(x, wg, wu, wd):
    return (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def fused_expert(x, gu, d, e):
    i = gu.shape[1] // 2
    return swiglu(x, gu[e, :i], gu[e, i:], d[e])


CORRECT = [
    (check_active_params, active_params),
    (check_expert_load, expert_load),
    (check_layer_params, layer_params),
    (check_ffn_params, ffn_params),
    (check_topk_softmax_router, topk_softmax),
    (check_topk_softmax_router, topk_softmax_reversed),
    (check_sigmoid_router, sigmoid_router),
    (check_swiglu, swiglu),
    (check_fused_expert, fused_expert),
]


@pytest.mark.parametrize("check,fn", CORRECT, ids=lambda v: getattr(v, "__name__", ""))
def test_correct_answer_passes(check, fn):
    result = check(fn)
    assert result.passed, result.message
    assert result.status == "passed"
    assert "✅" in repr(result)


def _not_done(*args):
    raise NotImplementedError("Your turn")


@pytest.mark.parametrize("check", sorted({c for c, _ in CORRECT}, key=lambda c: c.__name__))
def test_stub_is_not_done_yet(check):
    result = check(_not_done)
    assert not result.passed
    assert result.status == "not done"
    assert "not done yet" in result.message
    none_result = check(lambda *a: None)
    assert none_result.status == "not done" and "forget `return`" in none_result.message


# ---- wrong answers and the sentence each must get -------------------------------------------------


def _sig_variant(weights_from_biased=False, bias_where="scores", renorm=True, scale=True, score="sigmoid"):
    def fn(logits, bias, k, s):
        scores = logits.sigmoid() if score == "sigmoid" else logits.softmax(-1)
        if bias_where == "scores":
            choice = scores + bias
        elif bias_where == "logits":
            choice = (logits + bias).sigmoid()
        else:
            choice = scores
        idx = choice.topk(k, dim=-1).indices
        w = (choice if weights_from_biased else scores).gather(-1, idx)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        return (w * s if scale else w), idx

    return fn


def _topk(logits, k, dim=-1, renorm=True, largest=True):
    w, i = logits.softmax(dim).topk(k, dim=-1, largest=largest)
    return (w / w.sum(-1, keepdim=True) if renorm else w), i


WRONG = [
    (
        check_active_params,
        lambda e, k, h, i: (e * h + e * 2 * h * i, e * h + k * 2 * h * i),
        "three (gate, up",
    ),
    (check_active_params, lambda e, k, h, i: (3 * e * h * i, 3 * k * h * i), "left out the router"),
    (check_active_params, lambda e, k, h, i: (e * h + 3 * e * h * i, 3 * k * h * i), "router runs for every"),
    (check_active_params, lambda e, k, h, i: (e * h + 3 * e * h * i,) * 2, "only the K chosen"),
    (check_active_params, lambda e, k, h, i: (e * h + 3 * e * h * i, e * h + 3 * h * i), "only one expert"),
    (check_active_params, lambda e, k, h, i: 0, "should return a tuple"),
    (check_expert_load, lambda idx, e: torch.bincount(idx.reshape(-1)), "minlength"),
    (check_expert_load, lambda idx, e: torch.bincount(idx[:, 0], minlength=e), "first choice"),
    (
        check_expert_load,
        lambda idx, e: torch.bincount(idx.reshape(-1), minlength=e) / idx.numel(),
        "fractions",
    ),
    (check_expert_load, lambda idx, e: idx.sum(), "shape"),
    (check_layer_params, lambda c: layer_params(c.replace(n_shared_experts=0)), "left out the shared expert"),
    (
        check_layer_params,
        lambda c: (layer_params(c)[0], layer_params(c.replace(n_shared_experts=0))[1]),
        "belongs in the active count",
    ),
    (
        check_layer_params,
        lambda c: tuple(v - c.n_routed_experts * c.hidden_size for v in layer_params(c)),
        "router",
    ),
    (check_layer_params, lambda c: (layer_params(c)[0],) * 2, "only num_experts_per_tok"),
    (
        check_layer_params,
        lambda c: layer_params(c.replace(n_shared_experts=min(c.n_shared_experts, 1))),
        "a count, not an on/off flag",
    ),
    (
        check_ffn_params,
        lambda a: ffn_params(a.__class__(**{**a.__dict__, "first_k_dense_replace": 0})),
        "every layer",
    ),
    (
        check_ffn_params,
        lambda a: ffn_params(
            a.__class__(**{**a.__dict__, "first_k_dense_replace": a.first_k_dense_replace + 1})
        ),
        "one dense layer too many",
    ),
    (
        check_ffn_params,
        lambda a: tuple(
            v + a.first_k_dense_replace * lp for v, lp in zip(ffn_params(a), layer_params(a.moe))
        ),
        "replace the first MoE layers",
    ),
    (check_topk_softmax_router, lambda lg, k: _topk(lg, k, dim=0), "over the tokens (dim=0)"),
    (check_topk_softmax_router, lambda lg, k: _topk(lg, k, renorm=False), "forgot to renormalize"),
    (check_topk_softmax_router, lambda lg, k: lg.topk(k, dim=-1), "raw logits"),
    (check_topk_softmax_router, lambda lg, k: _topk(lg, k, largest=False), "smallest"),
    (check_topk_softmax_router, lambda lg, k: _topk(lg, k)[0], "tuple (weights, indices)"),
    (check_topk_softmax_router, lambda lg, k: (_topk(lg, k)[0], _topk(lg, k)[1].float()), "integers"),
    (check_sigmoid_router, _sig_variant(weights_from_biased=True), "unbiased sigmoid scores"),
    (check_sigmoid_router, _sig_variant(bias_where="logits"), "before the sigmoid"),
    (check_sigmoid_router, _sig_variant(bias_where="none"), "ignored the bias"),
    (check_sigmoid_router, _sig_variant(score="softmax"), "independent sigmoid"),
    (check_sigmoid_router, _sig_variant(renorm=False), "forgot to renormalize"),
    (check_sigmoid_router, _sig_variant(scale=False), "scaling_factor"),
    (check_swiglu, lambda x, wg, wu, wd: swiglu(x, wu, wg, wd), "gate and up are swapped"),
    (check_swiglu, lambda x, wg, wu, wd: ((x @ wg.T) * (x @ wu.T)) @ wd.T, "forgot the activation"),
    (check_swiglu, lambda x, wg, wu, wd: F.silu((x @ wg.T) * (x @ wu.T)) @ wd.T, "to the product"),
    (check_swiglu, lambda x, wg, wu, wd: (F.relu(x @ wg.T) * (x @ wu.T)) @ wd.T, "ReLU"),
    (check_swiglu, lambda x, wg, wu, wd: (F.silu(x @ wg.T) + (x @ wu.T)) @ wd.T, "added gate and up"),
    (check_swiglu, lambda x, wg, wu, wd: (F.silu(x @ wg.T) * (x @ wu.T)) @ wd, "raised RuntimeError"),
    (
        check_fused_expert,
        lambda x, gu, d, e: fused_expert(x, gu.flip(1).flip(1).roll(gu.shape[1] // 2, 1), d, e),
        "wrong way round",
    ),
    (check_fused_expert, lambda x, gu, d, e: swiglu(x, gu[e][0::2], gu[e][1::2], d[e]), "alternately"),
    (
        check_fused_expert,
        lambda x, gu, d, e: fused_expert(x, gu, d, (e + 1) % gu.shape[0]),
        "different expert",
    ),
]


@pytest.mark.parametrize("check,fn,expected", WRONG, ids=[f"{c.__name__}-{m[:20]}" for c, _, m in WRONG])
def test_wrong_answer_gets_plain_words(check, fn, expected):
    result = check(fn)
    assert not result.passed
    assert result.status == "failed"
    assert expected in result.message, result.message
    assert result.message.startswith("❌")


def test_not_a_function():
    result = check_swiglu(42)
    assert not result.passed and "expected a function" in result.message


def test_layer_params_refuses_the_library_shortcut():
    from glm4moe_lib.config import MoEConfig

    r = check_layer_params(lambda c: (c.num_parameters()["total"], c.num_parameters()["active"]))
    assert not r.passed and "count the parameters yourself" in r.message
    assert MoEConfig().num_parameters()["total"] > 0  # restored after the check


def test_routers_name_a_swapped_return_order():
    from glm4moe_lib.exercises import check_sigmoid_router, check_topk_softmax_router

    def swapped(logits, k):
        w, i = logits.softmax(-1).topk(k)
        return i, w / w.sum(-1, keepdim=True)

    r = check_topk_softmax_router(swapped)
    assert not r.passed and "return (weights, indices), in that order" in r.message, r.message

    def swapped_sigmoid(logits, bias, k, scale):
        i = (logits.sigmoid() + bias).topk(k).indices
        w = logits.sigmoid().gather(-1, i)
        return i, w / w.sum(-1, keepdim=True) * scale

    r = check_sigmoid_router(swapped_sigmoid)
    assert not r.passed and "in that order" in r.message, r.message


def test_fused_expert_names_a_missing_activation():
    import torch.nn.functional as F

    from glm4moe_lib.exercises import check_fused_expert

    def no_silu(x, gu, d, e):
        gate, up = gu[e].chunk(2, dim=0)
        return F.linear(F.linear(x, gate) * F.linear(x, up), d[e])

    assert "forgot the activation" in check_fused_expert(no_silu).message
