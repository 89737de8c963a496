"""The router, step by step: scores, selection bias, group-limited top-k, weights."""

import pytest
import torch

from glm4moe_lib import MoEConfig, TopkRouter, compute_scores, group_limited_mask, route


def test_scores_softmax_sums_to_one_sigmoid_does_not():
    logits = torch.randn(5, 8)
    assert torch.allclose(compute_scores(logits, "softmax").sum(-1), torch.ones(5))
    sig = compute_scores(logits, "sigmoid")
    assert torch.allclose(sig, torch.sigmoid(logits))
    assert not torch.allclose(sig.sum(-1), torch.ones(5))


def test_temperature_flattens_softmax():
    logits = torch.randn(4, 8) * 3
    hot, cold = compute_scores(logits, "softmax", 4.0), compute_scores(logits, "softmax", 0.25)
    assert (hot.max(-1).values < cold.max(-1).values).all()
    with pytest.raises(ValueError, match="temperature=0"):
        compute_scores(logits, "softmax", 0)


def test_route_matches_manual_topk_softmax():
    cfg = MoEConfig(n_routed_experts=8, num_experts_per_tok=2, scoring_func="softmax")
    logits = torch.randn(10, 8)
    out = route(logits, cfg)
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(out.topk_indices, top.indices)
    assert torch.allclose(out.topk_weights, top.values / top.values.sum(-1, keepdim=True))


def test_bias_changes_selection_not_weights():
    cfg = MoEConfig(n_routed_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    logits = torch.randn(6, 8)
    bias = torch.zeros(8)
    bias[3] = 10.0  # expert 3 always wins selection
    out = route(logits, cfg, bias)
    assert (out.topk_indices == 3).any(-1).all()
    # the weight of expert 3 is its unbiased sigmoid score
    slot = (out.topk_indices == 3).float().argmax(-1)
    w3 = out.topk_weights.gather(1, slot[:, None]).squeeze(1)
    assert torch.allclose(w3, torch.sigmoid(logits[:, 3]))


def test_group_limited_selection_stays_in_best_groups():
    cfg = MoEConfig(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    logits = torch.randn(50, 16)
    out = route(logits, cfg)
    scores = torch.sigmoid(logits)
    group_scores = scores.view(50, 4, 4).topk(2, dim=-1).values.sum(-1)
    best = group_scores.topk(2, dim=-1).indices
    groups = out.topk_indices // 4
    assert all(set(g.tolist()) <= set(b.tolist()) for g, b in zip(groups, best))
    mask = group_limited_mask(scores, 4, 2)
    assert mask.sum(-1).eq(8).all()


def test_weights_sum_to_scaling_factor_and_indices_distinct():
    cfg = MoEConfig(n_routed_experts=16, num_experts_per_tok=4, routed_scaling_factor=2.5)
    out = route(torch.randn(30, 16), cfg)
    assert torch.allclose(out.topk_weights.sum(-1), torch.full((30,), 2.5))
    assert all(len(set(row.tolist())) == 4 for row in out.topk_indices)


def test_route_rejects_wrong_logits_shape():
    with pytest.raises(ValueError, match=r"expected \[tokens, n_routed_experts=8\]"):
        route(torch.randn(3, 5), MoEConfig())


def test_router_math_in_float32_and_bias_stays_float32(device):
    router = TopkRouter(MoEConfig()).to(device)
    router.e_score_correction_bias.fill_(1e-3)
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.e_score_correction_bias[0].item() == pytest.approx(1e-3)
    out = router(torch.randn(2, 3, 64, device=device, dtype=torch.bfloat16))
    assert out.logits.dtype == out.scores.dtype == out.topk_weights.dtype == torch.float32
    assert out.topk_indices.shape == (6, 2) and out.logits.device.type == device.type


def test_router_state_dict_keys():
    assert set(TopkRouter(MoEConfig()).state_dict()) == {"weight", "e_score_correction_bias"}
