"""Balancing losses against transformers and the papers' formulas; the bias update; metrics."""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from glm4moe_lib import (
    expert_load,
    load_balancing_loss,
    load_entropy,
    max_violation,
    router_z_loss,
    routing_entropy,
    sequence_balance_loss,
    switch_loss,
    update_bias,
)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("layers", [1, 3])
def test_equals_transformers_without_mask(top_k, layers):
    torch.manual_seed(top_k * 10 + layers)
    logits = tuple(torch.randn(24, 8) * 2 for _ in range(layers))
    ours = load_balancing_loss(logits, top_k)
    theirs = load_balancing_loss_func(logits, num_experts=8, top_k=top_k)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2])
def test_equals_transformers_with_mask(layers):
    torch.manual_seed(7)
    batch, seq = 3, 5
    logits = tuple(torch.randn(batch * seq, 6) * 2 for _ in range(layers))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    ours = load_balancing_loss(logits, 2, attention_mask=mask)
    theirs = load_balancing_loss_func(logits, num_experts=6, top_k=2, attention_mask=mask)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # the masked rows really are ignored
    changed = tuple(x.clone() for x in logits)
    changed[0][3] += 100.0  # row (0, 3) is padding
    assert torch.allclose(load_balancing_loss(changed, 2, attention_mask=mask), ours)


def test_single_tensor_equals_one_layer_tuple():
    logits = torch.randn(10, 4)
    assert torch.equal(load_balancing_loss(logits, 2), load_balancing_loss((logits,), 2))


def test_uniform_routing_values_show_the_conventions():
    # every token has equal logits for all experts, and top-k picks cycle evenly over experts
    e, k = 8, 2
    logits = torch.zeros(e, e)
    logits[torch.arange(e), torch.arange(e)] = 1e-4  # tiny tie-break: token i prefers expert i
    logits[torch.arange(e), (torch.arange(e) + 1) % e] = 5e-5
    assert load_balancing_loss(logits, k).item() == pytest.approx(k, rel=1e-3)  # transformers: K
    assert switch_loss(logits).item() == pytest.approx(1.0, rel=1e-3)  # Switch: 1


def test_loss_grows_with_imbalance():
    balanced = torch.eye(8) * 3
    collapsed = torch.zeros(8, 8)
    collapsed[:, 0] = 3
    assert switch_loss(collapsed) > 2 * switch_loss(balanced)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="top_k=9"):
        load_balancing_loss(torch.randn(4, 8), 9)
    with pytest.raises(ValueError, match="non-empty sequence"):
        load_balancing_loss((), 2)
    with pytest.raises(ValueError, match=r"router_logits\[1\] has shape \(4, 5\)"):
        load_balancing_loss((torch.randn(4, 8), torch.randn(4, 5)), 2)
    with pytest.raises(ValueError, match="attention_mask has 6 positions"):
        load_balancing_loss(torch.randn(4, 8), 2, attention_mask=torch.ones(2, 3))


def test_z_loss_formula():
    logits = torch.randn(5, 8)
    expected = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
    assert torch.allclose(router_z_loss(logits), expected)
    assert router_z_loss(logits * 10) > router_z_loss(logits)


def test_sequence_loss_formula_and_uniform_value():
    torch.manual_seed(0)
    b, s, e, k = 2, 6, 4, 2
    scores = torch.rand(b * s, e)
    idx = scores.topk(k, dim=-1).indices
    # by hand, per sequence
    total = 0.0
    for seq in range(b):
        sc, ix = scores[seq * s : (seq + 1) * s], idx[seq * s : (seq + 1) * s]
        f = torch.bincount(ix.reshape(-1), minlength=e).float() * e / (k * s)
        p = (sc / sc.sum(-1, keepdim=True)).mean(0)
        total += (f * p).sum().item()
    assert sequence_balance_loss(scores, idx, b).item() == pytest.approx(total / b, rel=1e-6)
    # uniform scores and perfectly spread picks give 1
    uniform = torch.full((4, 4), 0.5)
    spread = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert sequence_balance_loss(uniform, spread, 1).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="batch_size=5"):
        sequence_balance_loss(scores, idx, 5)


def test_bias_update_moves_against_load():
    bias = torch.zeros(4)
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    update_bias(bias, load, update_rate=0.01)
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    with pytest.raises(ValueError, match="update_rate=-1"):
        update_bias(bias, load, update_rate=-1)
    with pytest.raises(ValueError, match="must match bias"):
        update_bias(bias, torch.ones(3))


def test_bias_updates_balance_a_skewed_router():
    from glm4moe_lib import MoEConfig, route

    torch.manual_seed(0)
    cfg = MoEConfig(n_routed_experts=8, num_experts_per_tok=2)
    logits = torch.randn(512, 8) + torch.linspace(2, -2, 8)  # experts 0, 1 are favoured
    bias = torch.zeros(8)
    before = max_violation(expert_load(route(logits, cfg, bias).topk_indices, 8))
    for _ in range(300):
        update_bias(bias, expert_load(route(logits, cfg, bias).topk_indices, 8), update_rate=0.01)
    after = max_violation(expert_load(route(logits, cfg, bias).topk_indices, 8))
    assert before > 1.0 and after < 0.2


def test_metrics():
    assert expert_load(torch.tensor([[0, 1], [0, 2]]), 4).tolist() == [2, 1, 1, 0]
    assert max_violation(torch.tensor([2.0, 2.0, 2.0])) == 0.0
    assert max_violation(torch.tensor([4.0, 0.0, 2.0])) == pytest.approx(1.0)
    assert load_entropy(torch.ones(8)) == pytest.approx(math.log(8))
    assert load_entropy(torch.tensor([5.0, 0, 0])) == pytest.approx(0.0, abs=1e-6)
    assert routing_entropy(torch.full((3, 4), 0.2)) == pytest.approx(math.log(4))
