"""The library's MoE against transformers' Glm4MoeMoE: same keys, same outputs, same gradients."""

import pytest
import torch
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

from glm4moe_lib import MoE, MoEConfig

CONFIGS = {
    "default": {},
    "grouped": {"n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2},
    "grouped-8-groups": {"n_routed_experts": 16, "num_experts_per_tok": 3, "n_group": 8, "topk_group": 2},
    "no-renorm": {"norm_topk_prob": False, "routed_scaling_factor": 2.5},
    "scaled-two-shared": {"routed_scaling_factor": 2.5, "n_shared_experts": 2, "num_experts_per_tok": 3},
    "top1-gelu": {"num_experts_per_tok": 1, "hidden_act": "gelu"},
    "glm45-shaped": {
        "hidden_size": 40,
        "moe_intermediate_size": 12,
        "n_routed_experts": 20,
        "num_experts_per_tok": 8,
        "routed_scaling_factor": 2.5,
    },
}


def make_pair(cfg: MoEConfig, seed: int = 0, bias_std: float = 0.3):
    """A transformers Glm4MoeMoE with random weights and selection bias, and the library copy."""
    torch.manual_seed(seed)
    hf = Glm4MoeMoE(cfg.to_hf())
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.3)
        hf.gate.e_score_correction_bias.normal_(std=bias_std)
    moe = MoE(cfg)
    moe.load_state_dict(hf.state_dict(), strict=True)
    return hf, moe


def test_state_dict_keys_and_shapes_match_transformers():
    cfg = MoEConfig(hidden_size=48, moe_intermediate_size=24, n_routed_experts=12, num_experts_per_tok=2)
    hf = Glm4MoeMoE(cfg.to_hf())
    ours = MoE(cfg).state_dict()
    theirs = hf.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert tuple(ours["experts.gate_up_proj"].shape) == (12, 48, 48)
    assert ours["gate.e_score_correction_bias"].dtype == torch.float32


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("strategy", ["auto", "loop", "sorted"])
def test_outputs_and_gradients_match_transformers(name, strategy):
    cfg = MoEConfig(**CONFIGS[name], dispatch=strategy)
    hf, moe = make_pair(cfg)
    x = torch.randn(3, 11, cfg.hidden_size)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, y_ours = hf(x_hf), moe(x_ours)
    assert y_ours.shape == x.shape
    _assert_grad_close(y_ours, y_hf, "output")
    grad_out = torch.randn_like(y_hf)
    y_hf.backward(grad_out)
    y_ours.backward(grad_out)
    _assert_grad_close(x_ours.grad, x_hf.grad, "input")
    hf_params = dict(hf.named_parameters())
    for pname, p in moe.named_parameters():
        _assert_grad_close(p.grad, hf_params[pname].grad, pname)


def _assert_grad_close(ours, theirs, name):
    """fp32 outputs and gradients equal to summation order: an element that is a sum of large terms
    that cancel carries an error relative to the tensor's scale, not to itself (BLAS builds and the
    fused CPU kernel order sums differently, and fuse multiply-adds), so atol scales with max|value|;
    a wrong expert or gradient is off by O(scale)."""
    scale = max(1.0, float(theirs.detach().abs().max()))
    err = float((ours - theirs).detach().abs().max())
    assert torch.allclose(ours, theirs, atol=1e-5 * scale, rtol=1e-4), f"{name}: max |diff| {err:.3g}"


def test_same_experts_selected_as_transformers():
    cfg = MoEConfig(**CONFIGS["grouped"])
    hf, moe = make_pair(cfg, seed=3)
    x = torch.randn(64, cfg.hidden_size)
    _, _, hf_idx = hf.gate(x)
    ours = moe.gate(x)
    assert torch.equal(hf_idx.sort(-1).values, ours.topk_indices.sort(-1).values)


def test_from_hf_copies_config_and_weights():
    cfg = MoEConfig(**CONFIGS["no-renorm"])
    hf, _ = make_pair(cfg, seed=5)
    moe = MoE.from_hf(hf)
    assert moe.config.routed_scaling_factor == 2.5 and moe.config.norm_topk_prob is False
    x = torch.randn(7, cfg.hidden_size)
    _assert_grad_close(moe(x), hf(x), "output")


def test_any_leading_shape_and_empty_batch():
    moe = MoE(MoEConfig())
    for shape in [(64,), (5, 64), (2, 3, 64), (2, 0, 64), (0, 64)]:
        x = torch.randn(shape)
        y, routing = moe(x, return_routing=True)
        assert y.shape == x.shape
        tokens = x.numel() // 64
        assert routing.topk_indices.shape == (tokens, 2)
    y = moe(torch.randn(0, 64, requires_grad=True))
    y.sum().backward()  # an empty batch still backpropagates


def test_no_shared_expert_config():
    moe = MoE(MoEConfig(n_shared_experts=0, scoring_func="softmax"))
    assert moe.shared_experts is None
    assert not any(k.startswith("shared_experts") for k in moe.state_dict())
    assert moe(torch.randn(4, 64)).shape == (4, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_and_device_follow_input(device, dtype):
    moe = MoE(MoEConfig()).to(device=device, dtype=dtype)
    x = torch.randn(4, 5, 64, device=device, dtype=dtype)
    y, routing = moe(x, return_routing=True)
    assert y.dtype == dtype and y.device.type == device.type
    assert routing.topk_weights.dtype == torch.float32


def test_bfloat16_close_to_float32():
    torch.manual_seed(0)
    moe = MoE(MoEConfig())
    x = torch.randn(32, 64)
    ref = moe(x)
    low = moe.to(torch.bfloat16)(x.bfloat16()).float()
    assert (low - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_bad_inputs_get_clear_errors():
    moe = MoE(MoEConfig())
    with pytest.raises(ValueError, match=r"last dimension must be hidden_size=64"):
        moe(torch.randn(3, 32))
    with pytest.raises(ValueError, match="floating-point"):
        moe(torch.ones(3, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"dtype torch.float64 .* moe.to\(torch.float64\)"):
        moe(torch.randn(3, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        moe([[0.0] * 64])
    with pytest.raises(TypeError, match="MoEConfig"):
        MoE({"hidden_size": 64})
    with pytest.raises(ValueError, match="strategy='fast'"):
        moe.experts(
            torch.randn(2, 64), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), strategy="fast"
        )
