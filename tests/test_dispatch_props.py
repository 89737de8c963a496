"""Property tests: every dispatch strategy equals the dense reference (every expert on every token)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm4moe_lib import MoE, MoEConfig, dense_reference, plan_dispatch, route
from glm4moe_lib.dispatch import strategies_for


@st.composite
def routed_batches(draw):
    e = draw(st.sampled_from([2, 4, 6, 8, 12, 16]))
    groups = [g for g in (1, 2, 4) if e % g == 0 and e // g >= 2]
    n_group = draw(st.sampled_from(groups))
    topk_group = draw(st.integers(1, n_group))
    k = draw(st.integers(1, topk_group * (e // n_group)))
    cfg = MoEConfig(
        hidden_size=draw(st.sampled_from([4, 8, 16])),
        moe_intermediate_size=draw(st.sampled_from([2, 8])),
        n_routed_experts=e,
        num_experts_per_tok=k,
        n_shared_experts=draw(st.integers(0, 2)),
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 0.5])),
        scoring_func=draw(st.sampled_from(["softmax", "sigmoid"])),
    )
    tokens = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**16))
    skew = draw(st.booleans())
    return cfg, tokens, seed, skew


@settings(max_examples=60, deadline=None)
@given(routed_batches())
def test_every_strategy_equals_dense_reference(batch):
    cfg, tokens, seed, skew = batch
    torch.manual_seed(seed)
    moe = MoE(cfg)
    if skew:  # most tokens want expert 0: some experts receive nothing
        with torch.no_grad():
            moe.gate.e_score_correction_bias[0] = 5.0
    x = torch.randn(tokens, cfg.hidden_size)
    routing = moe.gate(x)
    idx, w = routing.topk_indices, routing.topk_weights
    ref = dense_reference(x, idx, w, moe.experts.gate_up_proj, moe.experts.down_proj, moe.experts.act_fn)
    for name in strategies_for("cpu", act_fn=moe.experts.act_fn):
        out = moe.experts(x, idx, w, strategy=name)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), name
    # router invariants
    assert all(len(set(r.tolist())) == cfg.num_experts_per_tok for r in idx)
    if cfg.norm_topk_prob and tokens:
        assert torch.allclose(w.sum(-1), torch.full((tokens,), float(cfg.routed_scaling_factor)), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(routed_batches())
def test_gradients_equal_dense_reference(batch):
    cfg, tokens, seed, _ = batch
    torch.manual_seed(seed)
    moe = MoE(cfg)
    x = torch.randn(tokens, cfg.hidden_size)
    routing = moe.gate(x)
    grads = {}
    for name in ["dense", *strategies_for("cpu", act_fn=moe.experts.act_fn)]:
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        w = routing.topk_weights.detach().clone().requires_grad_()
        if name == "dense":
            out = dense_reference(
                xi, routing.topk_indices, w, moe.experts.gate_up_proj, moe.experts.down_proj
            )
        else:
            out = moe.experts(xi, routing.topk_indices, w, strategy=name)
        if out.requires_grad:  # an empty batch may give an output with no graph at all
            out.square().sum().backward()
        tensors = (xi, w, moe.experts.gate_up_proj, moe.experts.down_proj)
        grads[name] = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]
    for name, g in grads.items():
        for a, b in zip(g, grads["dense"]):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), name


def test_plan_groups_pairs_by_expert():
    idx = torch.tensor([[2, 0], [1, 2], [2, 3]])
    plan = plan_dispatch(idx, num_experts=5)
    assert plan.counts.tolist() == [1, 1, 3, 1, 0]
    assert plan.offsets.tolist() == [0, 1, 2, 5, 6, 6]
    assert plan.expert_ids.tolist() == [0, 1, 2, 2, 2, 3]
    assert plan.token_ids.tolist() == [0, 1, 0, 1, 2, 2]
    assert torch.equal(idx.reshape(-1)[plan.order], plan.expert_ids)


def test_shape_dtype_device_follow_input(device):
    cfg = MoEConfig()
    moe = MoE(cfg).to(device)
    x = torch.randn(9, cfg.hidden_size, device=device)
    routing = route(torch.randn(9, cfg.n_routed_experts, device=device), cfg)
    for name in strategies_for(device):
        out = moe.experts(x, routing.topk_indices, routing.topk_weights, strategy=name)
        assert out.shape == x.shape and out.device.type == device.type and out.dtype == x.dtype


def test_empty_batch_stays_on_the_graph():
    # No shared expert: the routed experts alone must still backpropagate through an empty batch.
    moe = MoE(MoEConfig(n_shared_experts=0))
    for name in strategies_for("cpu"):
        moe.zero_grad()
        x = torch.randn(0, 64, requires_grad=True)
        moe.experts(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), strategy=name).sum().backward()
        assert moe.experts.gate_up_proj.grad is not None and not moe.experts.gate_up_proj.grad.any(), name
        assert x.grad is not None and x.grad.shape == (0, 64), name


def test_routing_that_does_not_fit_gets_a_clear_error():
    import pytest

    experts = MoE(MoEConfig()).experts
    x, w = torch.randn(3, 64), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"expert ids from 0 to 8: they must lie in \[0, 8\)"):
        experts(x, torch.tensor([[0, 8], [1, 2], [3, 4]]), w)
    with pytest.raises(ValueError, match=r"top_k_index has shape \(2, 2\): expected \[tokens=3, top_k\]"):
        experts(x, torch.zeros(2, 2, dtype=torch.long), w[:2])
    with pytest.raises(ValueError, match="top_k_weights has shape"):
        experts(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"dtype torch.float32: an int64 \(or int32\) tensor of expert ids"):
        experts(x, torch.zeros(3, 2), w)
