"""Defects a review of the core modules found (config, router, experts, dispatch, moe, balance,
device): each test failed before its fix."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import Glm4MoeConfig, MixtralConfig
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

from glm4moe_lib import MoE, MoEConfig, pick_device
from glm4moe_lib.balance import load_entropy, max_violation, routing_entropy, sequence_balance_loss
from glm4moe_lib.dispatch import capacity_keep_mask, dispatch_combine, expert_capacity
from glm4moe_lib.experts import MLP, swiglu
from glm4moe_lib.router import compute_scores, route


def _layer(**changes) -> MoE:
    torch.manual_seed(0)
    return MoE(MoEConfig(**changes))


def test_the_activation_is_the_modules_whatever_config_hidden_act_says_later():
    # the fused C path (a few tokens) once read config.hidden_act while the modules kept theirs:
    # two tokens ran SiLU, four hundred GELU
    moe = _layer(hidden_act="gelu", n_shared_experts=0)
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = moe(x)
        moe.config.hidden_act = "silu"  # allowed, but the built modules keep GELU
        small, big = moe(x), moe(x.repeat(200, 1))[:2]
    assert moe.experts.act_fn is F.gelu
    torch.testing.assert_close(small, before)
    torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-5)


def test_from_hf_refuses_a_config_that_lacks_glm_fields():
    with pytest.raises(
        ValueError, match=r"MixtralConfig lacks \[.*'moe_intermediate_size'.*'n_shared_experts'"
    ):
        MoEConfig.from_hf(MixtralConfig())
    with pytest.raises(ValueError, match="lacks"):
        MoEConfig.from_hf({"hidden_size": 4096, "n_routed_experts": 128})
    full = Glm4MoeConfig().to_dict()
    assert MoEConfig.from_hf(full).moe_intermediate_size == full["moe_intermediate_size"]
    fields = {
        k: full[k]
        for k in ("hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")
    }
    filled = MoEConfig.from_hf(
        fields, n_shared_experts=0, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0
    )  # the missing ones as overrides: allowed
    assert filled.n_shared_experts == 0


@pytest.mark.parametrize("tokens", [2, 300])
@pytest.mark.parametrize("strategy", ["auto", "grouped_mm"])
def test_cpu_autocast_bf16_runs_every_strategy(strategy, tokens):
    moe = _layer(dispatch=strategy)
    x = torch.randn(tokens, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x.bfloat16())
        moe.config.dispatch = "sorted"
        ref = moe(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_meta_init_then_to_empty_and_the_bias_stays_float32():
    with torch.device("meta"):
        moe = MoE(MoEConfig())
    moe.to_empty(device="cpu")
    bias = moe.gate.e_score_correction_bias
    assert bias.device.type == "cpu" and bias.dtype == torch.float32
    moe = _layer()
    moe.gate.e_score_correction_bias.fill_(0.1234567)
    moe.bfloat16()
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.e_score_correction_bias[0].item() == pytest.approx(0.1234567, abs=1e-8)  # not rounded


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int8])
@pytest.mark.parametrize("strategy", ["dense", "gather_bmm", "padded", "loop", "fused_cpu"])
def test_expert_ids_of_other_integer_types_are_refused_by_name(strategy, dtype):
    moe = _layer()
    x = torch.randn(5, 64)
    r = moe.gate(x)
    args = (x, r.topk_indices.to(dtype), r.topk_weights, moe.experts.gate_up_proj, moe.experts.down_proj)
    with pytest.raises(ValueError, match=f"top_k_index has dtype {dtype}: an int64 \\(or int32\\)"):
        dispatch_combine(*args, strategy=strategy)
    ok = dispatch_combine(x, r.topk_indices.int(), *args[2:], strategy=strategy)  # int32: accepted
    torch.testing.assert_close(ok, dispatch_combine(x, r.topk_indices, *args[2:], strategy="dense"))


def test_sequence_balance_loss_refuses_logits():
    moe = _layer()
    r = moe.gate(torch.randn(32, 64))
    assert sequence_balance_loss(r.scores, r.topk_indices, 2) > 0
    with pytest.raises(ValueError, match="not raw logits"):
        sequence_balance_loss(r.logits, r.topk_indices, 2)


def test_from_hf_loads_a_layer_without_shared_expert():
    torch.manual_seed(0)
    hf = Glm4MoeMoE(MoEConfig(n_shared_experts=0).to_hf())
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe = MoE.from_hf(hf)
    assert moe.shared_experts is None
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), hf(x), rtol=1e-5, atol=1e-5)


def test_capacity_helpers_check_their_arguments():
    for args, name in [
        ((10, 0, 2, 1.0), "num_experts=0"),
        ((-10, 4, 2, 1.0), "num_tokens=-10"),
        ((10, 4, 8, 1.0), "top_k=8"),
        ((10, 4, 2, "1"), "capacity_factor='1'"),
    ]:
        with pytest.raises(ValueError, match=name):
            expert_capacity(*args)
    assert expert_capacity(10, 4, 2, 1.0) == 5
    idx = torch.tensor([[0, 1], [1, 2]])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="capacity="):
            capacity_keep_mask(idx, 4, bad)
    assert capacity_keep_mask(idx[:, :0], 4, 2).shape == (2, 0)
    assert capacity_keep_mask(idx, 4, 0).sum() == 0


@pytest.mark.parametrize("bad", [math.inf, "1", None, 0, -1.0, True])
def test_temperature_must_be_a_finite_positive_number(bad):
    with pytest.raises(ValueError, match="temperature="):
        compute_scores(torch.zeros(2, 8), temperature=bad)
    with pytest.raises(ValueError, match="temperature="):
        route(torch.zeros(2, 8), MoEConfig(), temperature=bad)


def test_route_names_a_list_argument():
    with pytest.raises(TypeError, match="logits is a list"):
        route([[0.0] * 8], MoEConfig())
    with pytest.raises(TypeError, match="bias is a list"):
        route(torch.zeros(2, 8), MoEConfig(), bias=[0.0] * 8)


def test_balance_metrics_take_training_scores_and_refuse_bad_loads():
    moe = _layer()
    scores = moe.gate(torch.randn(8, 64)).scores  # requires grad: a training forward's output
    assert scores.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 0 < routing_entropy(scores) <= math.log(8)
    for bad in (torch.zeros(0), torch.tensor([-1.0, 2.0])):
        with pytest.raises(ValueError, match="load has"):
            load_entropy(bad)
        with pytest.raises(ValueError, match="load has"):
            max_violation(bad)
    assert load_entropy(torch.zeros(4)) == 0.0


def test_pick_device_takes_an_indexed_cpu_and_names_the_environment_variable(monkeypatch):
    monkeypatch.delenv("GLM4MOE_DEVICE", raising=False)
    assert pick_device(torch.device("cpu", 0)) == torch.device("cpu")
    monkeypatch.setenv("GLM4MOE_DEVICE", "gpu")
    with pytest.raises(ValueError, match="GLM4MOE_DEVICE='gpu' is not allowed"):
        pick_device()
    with pytest.raises(ValueError, match="^device='tpu' is not allowed"):
        pick_device("tpu")


def test_swiglu_and_mlp_give_clear_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"gate_up has shape \(17, 8\)"):
        swiglu(x, torch.randn(17, 8), torch.randn(8, 8))
    with pytest.raises(ValueError, match="last dimension must be H=8"):
        swiglu(torch.randn(3, 7), torch.randn(16, 8), torch.randn(8, 8))
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        MLP(4, 4)(torch.ones(2, 4, dtype=torch.long))
    assert swiglu(x, torch.randn(16, 8), torch.randn(8, 8)).shape == (3, 8)
