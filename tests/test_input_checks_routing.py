"""Bad input to the router, the config conversion and the balancing helpers gets a clear error."""

import math

import pytest
import torch
from transformers import Glm4MoeConfig
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from glm4moe_lib import (
    MoEConfig,
    TopkRouter,
    expert_load,
    group_limited_mask,
    load_balancing_loss,
    max_violation,
    router_z_loss,
    routing_entropy,
    sequence_balance_loss,
    update_bias,
)
from glm4moe_lib.config import preset

# ---- router -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 64), (3, 33), (2, 5, 16), (32, 1)])
def test_router_rejects_wrong_hidden_size(shape):
    router = TopkRouter(preset("tiny"))  # hidden_size=32
    with pytest.raises(ValueError, match=r"hidden_states has shape .*hidden_size=32"):
        router(torch.randn(*shape))


def test_router_rejects_scalar_and_integer_input():
    router = TopkRouter(preset("tiny"))
    with pytest.raises(ValueError, match=r"hidden_states has shape \(\)"):
        router(torch.tensor(1.0))
    with pytest.raises(TypeError, match="hidden_states has dtype torch.int64"):
        router(torch.ones(4, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="hidden_states is a list"):
        router([[0.0] * 32])


def test_router_valid_input_unchanged():
    torch.manual_seed(0)
    cfg = preset("small")
    router = TopkRouter(cfg)
    x = torch.randn(2, 5, cfg.hidden_size)
    out = router(x)
    logits = x.reshape(-1, cfg.hidden_size) @ router.weight.T
    assert out.topk_indices.shape == (10, cfg.num_experts_per_tok)
    assert torch.allclose(out.logits, logits, atol=1e-5)


@pytest.mark.parametrize("config", [None, {"hidden_size": 32}, Glm4MoeConfig()])
def test_router_needs_a_moe_config(config):
    with pytest.raises(TypeError, match="config of type .* needs a MoEConfig"):
        TopkRouter(config)


# ---- group-limited mask -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_group", "topk_group", "match"),
    [
        (4, 0, "topk_group=0"),
        (4, -1, "topk_group=-1"),
        (4, 5, "topk_group=5"),
        (4, 2.0, r"topk_group=2\.0"),
        (0, 1, "n_group=0"),
        (-2, 1, "n_group=-2"),
        (3, 1, "n_group=3"),
        (4.0, 2, r"n_group=4\.0"),
        (16, 8, "n_group=16"),  # groups of 1 expert have no "two best" experts
    ],
)
def test_group_mask_rejects_bad_groups(n_group, topk_group, match):
    with pytest.raises(ValueError, match=match):
        group_limited_mask(torch.rand(5, 16), n_group, topk_group)


def test_group_mask_rejects_wrong_choice_shape():
    with pytest.raises(ValueError, match=r"choice has shape \(16,\)"):
        group_limited_mask(torch.rand(16), 4, 2)


def test_group_mask_valid_input_unchanged():
    torch.manual_seed(1)
    choice = torch.rand(6, 16)
    mask = group_limited_mask(choice, 4, 2)
    # by hand: each group's score is the sum of its two best experts; keep the two best groups
    group_scores = choice.view(6, 4, 4).topk(2, dim=-1).values.sum(-1)
    best = group_scores.topk(2, dim=-1).indices
    expected = torch.zeros(6, 4, dtype=torch.bool).scatter_(1, best, True).repeat_interleave(4, dim=1)
    assert torch.equal(mask, expected)
    assert bool(group_limited_mask(choice, 4, 4).all()) and bool(group_limited_mask(choice, 1, 1).all())


# ---- MoEConfig.from_hf --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, 3, "glm4.5", object()])
def test_from_hf_rejects_objects_without_fields(bad):
    with pytest.raises(TypeError, match="hf_config of type .* has none of the MoEConfig fields"):
        MoEConfig.from_hf(bad)


# ---- sequence-wise loss -------------------------------------------------------------------------


def _routing(rows=6, e=8, k=2, seed=0):
    torch.manual_seed(seed)
    scores = torch.rand(rows, e)
    return scores, scores.topk(k, dim=-1).indices


@pytest.mark.parametrize(
    "make_idx",
    [
        lambda idx: idx[:4],  # fewer rows than scores
        lambda idx: idx[:, 0],  # 1-D
        lambda idx: idx.T,  # transposed
        lambda idx: idx[:, :0],  # K = 0
    ],
)
def test_sequence_loss_rejects_bad_index_shapes(make_idx):
    scores, idx = _routing()
    with pytest.raises(ValueError, match=r"topk_indices has shape .*tokens=6"):
        sequence_balance_loss(scores, make_idx(idx), 2)


@pytest.mark.parametrize("bad_id", [8, -1])
def test_sequence_loss_rejects_out_of_range_ids(bad_id):
    scores, idx = _routing()
    idx[3, 1] = bad_id
    with pytest.raises(ValueError, match=rf"topk_indices holds expert ids .*{bad_id}.*\[0, 8\)"):
        sequence_balance_loss(scores, idx, 2)


def test_sequence_loss_rejects_bad_scores_and_batch_size():
    scores, idx = _routing()
    with pytest.raises(ValueError, match=r"scores has shape \(48,\)"):
        sequence_balance_loss(scores.reshape(-1), idx, 2)
    with pytest.raises(ValueError, match=r"scores has shape \(0, 8\)"):
        sequence_balance_loss(scores[:0], idx[:0], 1)
    with pytest.raises(TypeError, match=r"batch_size=2\.0"):
        sequence_balance_loss(scores, idx, 2.0)
    with pytest.raises(ValueError, match="batch_size=4"):
        sequence_balance_loss(scores, idx, 4)
    with pytest.raises(ValueError, match="batch_size=0"):
        sequence_balance_loss(scores, idx, 0)
    with pytest.raises(ValueError, match="topk_indices has dtype torch.float32"):
        sequence_balance_loss(scores, idx.float(), 2)


def test_sequence_loss_valid_input_unchanged():
    scores, idx = _routing(rows=12, e=4, k=2, seed=3)
    total = 0.0
    for seq in range(3):
        sc, ix = scores[seq * 4 : (seq + 1) * 4], idx[seq * 4 : (seq + 1) * 4]
        f = torch.bincount(ix.reshape(-1), minlength=4).float() * 4 / (2 * 4)
        total += (f * (sc / sc.sum(-1, keepdim=True)).mean(0)).sum().item()
    assert sequence_balance_loss(scores, idx, 3).item() == pytest.approx(total / 3, rel=1e-6)
    assert sequence_balance_loss(scores, idx.int(), 3).item() == pytest.approx(total / 3, rel=1e-6)


# ---- expert load, bias update, MaxVio -----------------------------------------------------------


def test_expert_load_rejects_bad_input():
    with pytest.raises(ValueError, match=r"topk_indices holds expert ids from 0 to 9: .*\[0, 4\)"):
        expert_load(torch.tensor([[0, 9]]), 4)
    with pytest.raises(ValueError, match=r"topk_indices holds expert ids from -1"):
        expert_load(torch.tensor([[0, -1]]), 4)
    for bad in (0, -3, 4.0, True):
        with pytest.raises(ValueError, match=f"num_experts={bad!r}"):
            expert_load(torch.tensor([[0, 1]]), bad)
    with pytest.raises(ValueError, match="topk_indices has dtype torch.float32"):
        expert_load(torch.tensor([[0.0, 1.0]]), 4)


def test_expert_load_valid_input_unchanged():
    assert expert_load(torch.tensor([[0, 1], [0, 3]]), 4).tolist() == [2, 1, 0, 1]
    assert expert_load(torch.zeros(0, 2, dtype=torch.long), 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize("rate", [float("inf"), float("-inf"), float("nan"), -0.5])
def test_update_bias_rejects_non_finite_or_negative_rate(rate):
    bias = torch.zeros(4)
    with pytest.raises(ValueError, match="update_rate=.*finite number >= 0"):
        update_bias(bias, torch.tensor([1.0, 2.0, 3.0, 4.0]), rate)
    assert torch.equal(bias, torch.zeros(4))  # untouched


def test_update_bias_rejects_non_numbers_and_shapes():
    with pytest.raises(TypeError, match="update_rate='0.1'"):
        update_bias(torch.zeros(4), torch.ones(4), "0.1")
    with pytest.raises(ValueError, match="load has shape"):
        update_bias(torch.zeros(4), torch.ones(4, 1))


def test_update_bias_valid_input_unchanged():
    bias = torch.zeros(3)
    update_bias(bias, torch.tensor([6.0, 0.0, 3.0]), 0.5)
    assert bias.tolist() == [-0.5, 0.5, 0.0]
    update_bias(bias, torch.tensor([6.0, 0.0, 3.0]), 0)  # 0 is allowed: no change
    assert bias.tolist() == [-0.5, 0.5, 0.0]


def test_max_violation_rejects_empty_load():
    with pytest.raises(ValueError, match=r"load has shape \(0,\)"):
        max_violation(torch.tensor([]))
    assert max_violation(torch.tensor([3.0, 1.0])) == pytest.approx(0.5)
    assert max_violation(torch.zeros(4)) == 0.0


# ---- auxiliary losses ---------------------------------------------------------------------------


def test_transformers_gives_nan_where_we_raise():
    # why we raise: a NaN loss would silently poison training
    logits = torch.randn(6, 8)
    mask = torch.zeros(2, 3)
    assert math.isnan(load_balancing_loss_func((logits,), 8, 2, attention_mask=mask).item())
    with pytest.raises(ValueError, match="attention_mask has no real tokens"):
        load_balancing_loss(logits, 2, attention_mask=mask)


@pytest.mark.parametrize("fn", [lambda x: load_balancing_loss(x, 2), router_z_loss])
def test_losses_reject_zero_rows(fn):
    with pytest.raises(ValueError, match="router_logits has 0 rows"):
        fn(torch.zeros(0, 8))
    with pytest.raises(ValueError, match="router_logits has 0 rows"):
        fn((torch.zeros(0, 8), torch.zeros(0, 8)))


def test_losses_valid_input_unchanged():
    torch.manual_seed(5)
    logits = (torch.randn(6, 8), torch.randn(6, 8))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ours = load_balancing_loss(logits, 2, attention_mask=mask)
    assert torch.allclose(ours, load_balancing_loss_func(logits, 8, 2, attention_mask=mask), atol=1e-6)
    # a layer with no rows next to a real one is fine without a mask
    assert torch.isfinite(load_balancing_loss((logits[0], torch.zeros(0, 8)), 2))


# ---- routing entropy ----------------------------------------------------------------------------


def test_routing_entropy_rejects_logits():
    with pytest.raises(ValueError, match="scores has a minimum of -.*not raw logits"):
        routing_entropy(torch.tensor([[2.0, -1.0, 0.5]]))
    with pytest.raises(ValueError, match="scores has a minimum of nan"):
        routing_entropy(torch.tensor([[float("nan"), 0.5]]))
    with pytest.raises(ValueError, match=r"scores has shape \(0, 4\)"):
        routing_entropy(torch.zeros(0, 4))


def test_routing_entropy_valid_input_unchanged():
    assert routing_entropy(torch.full((3, 4), 0.2)) == pytest.approx(math.log(4))
    assert routing_entropy(torch.tensor([[1.0, 0.0, 0.0]])) == pytest.approx(0.0, abs=1e-6)
    assert routing_entropy(torch.randn(5, 8).sigmoid()) <= math.log(8) + 1e-6
