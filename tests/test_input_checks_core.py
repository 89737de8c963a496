"""Bad input to the core layer (dispatch, experts, the fused CPU layer) gets a clear error, float64
runs, and a batch without (token, expert) pairs gives zeros: found by an adversarial review."""

import dataclasses

import pytest
import torch

from glm4moe_lib import MoE, MoEConfig, cpu_kernel, dispatch
from glm4moe_lib.dispatch import (
    choose_strategy,
    dense_reference,
    dispatch_combine,
    gather_bmm_dispatch,
    grouped_mm_dispatch,
    loop_dispatch,
    padded_dispatch,
    plan_dispatch,
    sorted_dispatch,
    sorted_gather_dispatch,
)
from glm4moe_lib.experts import MLP, Experts

PUBLIC_STRATEGIES = [
    dense_reference,
    loop_dispatch,
    sorted_dispatch,
    gather_bmm_dispatch,
    sorted_gather_dispatch,
    padded_dispatch,
    grouped_mm_dispatch,
]
TORCH_STRATEGIES = [s for s in dispatch.STRATEGIES if s != "fused_cpu"]


def _batch(tokens=5, top_k=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts = Experts(MoEConfig()).to(dtype)
    x = torch.randn(tokens, 64, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(8, generator=gen)[:top_k] for _ in range(tokens)])  # [T, K] distinct
    w = torch.rand(tokens, top_k, generator=gen)
    return x, idx, w, experts


# ---- the public strategy functions check their arguments -----------------------------------------
@pytest.mark.parametrize("fn", PUBLIC_STRATEGIES, ids=lambda f: f.__name__)
def test_public_strategies_reject_out_of_range_ids(fn):
    x, idx, w, ex = _batch()
    with pytest.raises(ValueError, match=r"top_k_index holds expert ids from \d+ to \d+: .*\[0, 8\)"):
        fn(x, idx + 8, w, ex.gate_up_proj, ex.down_proj)
    negative = idx.clone()
    negative[2, 1] = -1
    with pytest.raises(ValueError, match="top_k_index holds expert ids from -1 to"):
        fn(x, negative, w, ex.gate_up_proj, ex.down_proj)


@pytest.mark.parametrize("fn", PUBLIC_STRATEGIES, ids=lambda f: f.__name__)
def test_public_strategies_reject_bad_shapes_and_dtypes(fn):
    x, idx, w, ex = _batch()
    gu, dn = ex.gate_up_proj, ex.down_proj
    with pytest.raises(ValueError, match=r"top_k_index has shape \(10,\)"):
        fn(x, idx.flatten(), w, gu, dn)  # 1-D ids used to give a result from sorted_dispatch
    with pytest.raises(ValueError, match=r"hidden_states has shape \(5, 10\)"):
        fn(x[:, :10], idx, w, gu, dn)
    with pytest.raises(ValueError, match=r"top_k_weights has shape \(5, 1\)"):
        fn(x, idx, w[:, :1], gu, dn)
    with pytest.raises(ValueError, match="hidden_states has dtype torch.float64 but the experts' weights"):
        fn(x.double(), idx, w, gu, dn)
    with pytest.raises(ValueError, match="hidden_states has dtype torch.int64: a floating-point"):
        fn(x.long(), idx, w, gu, dn)
    with pytest.raises(ValueError, match="top_k_index has dtype torch.float32"):
        fn(x, idx.float(), w, gu, dn)
    with pytest.raises(TypeError, match="top_k_weights must be a torch.Tensor, got list"):
        fn(x, idx, w.tolist(), gu, dn)


def test_dispatch_combine_checks_dtypes_before_choosing():
    x, idx, w, ex = _batch()
    for bad, message in (
        (x.long(), "hidden_states has dtype torch.int64"),
        (x.double(), "hidden_states has dtype torch.float64 but"),
    ):
        with pytest.raises(ValueError, match=message):
            dispatch_combine(bad, idx, w, ex.gate_up_proj, ex.down_proj)
        with pytest.raises(ValueError, match=message):
            ex(bad, idx, w)
    with pytest.raises(ValueError, match="down_proj has dtype torch.float64 but gate_up_proj"):
        dispatch_combine(x, idx, w, ex.gate_up_proj, ex.down_proj.double())
    with pytest.raises(ValueError, match="strategy='nope' is not allowed"):
        dispatch_combine(x, idx, w, ex.gate_up_proj, ex.down_proj, strategy="nope")


def test_plan_dispatch_checks_its_ids():
    _, idx, _, _ = _batch()
    with pytest.raises(ValueError, match=r"expert ids from \d+ to \d+: they must lie in \[0, 8\)"):
        plan_dispatch(idx + 8, 8)
    with pytest.raises(ValueError, match=r"top_k_index has shape \(10,\)"):
        plan_dispatch(idx.flatten(), 8)
    with pytest.raises(ValueError, match="num_experts=0 is not allowed"):
        plan_dispatch(idx, 0)
    plan = plan_dispatch(idx, 8)  # valid ids: the same plan as before
    assert torch.equal(plan.counts, torch.bincount(idx.flatten(), minlength=8))


# ---- K = 0 and T = 0: zeros, on the graph ----------------------------------------------------------
@pytest.mark.parametrize("strategy", TORCH_STRATEGIES + ["auto"])
def test_no_pairs_gives_zeros_with_gradients(strategy):
    x, idx, w, ex = _batch()
    for tokens, top_k in ((5, 0), (0, 2)):
        xs = x[:tokens].clone().requires_grad_(True)
        out = ex(xs, idx[:tokens, :top_k], w[:tokens, :top_k], strategy=strategy)
        assert out.shape == (tokens, 64) and not out.any()
        out.sum().backward()
        assert ex.gate_up_proj.grad is not None and not ex.gate_up_proj.grad.any()
        ex.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fn", PUBLIC_STRATEGIES, ids=lambda f: f.__name__)
def test_public_strategies_with_k_zero(fn):
    x, idx, w, ex = _batch()
    out = fn(x, idx[:, :0], w[:, :0], ex.gate_up_proj, ex.down_proj)
    assert out.shape == x.shape and not out.any()


# ---- float64 ---------------------------------------------------------------------------------------
def test_float64_never_picks_grouped_mm_on_cpu():
    x, idx, _, _ = _batch(tokens=64)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert choose_strategy(x.double(), idx, 8) != "grouped_mm"
            # float32 may still take it (where the C kernel does not): the dtype is what changed
    assert dispatch.GROUPED_MM_DTYPES == (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("strategy", ["auto", "grouped_mm", "padded", "sorted"])
def test_float64_layer_matches_float32(strategy):
    torch.manual_seed(0)
    layer = MoE(dataclasses.replace(MoEConfig(), dispatch=strategy))
    x = torch.randn(3, 40, 64)
    ref = layer(x)
    layer64 = MoE(dataclasses.replace(MoEConfig(), dispatch=strategy))
    layer64.load_state_dict(layer.state_dict())
    layer64.double()
    x64 = x.double().requires_grad_(True)
    out = layer64(x64)  # used to fail inside torch's grouped GEMM ("got Double")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert x64.grad is not None and layer64.experts.gate_up_proj.grad.dtype == torch.float64


def test_grouped_mm_dispatch_float64_falls_back_to_the_same_math():
    x, idx, w, ex = _batch(dtype=torch.float64)
    out = grouped_mm_dispatch(x, idx, w, ex.gate_up_proj, ex.down_proj)
    ref = dense_reference(x, idx, w, ex.gate_up_proj, ex.down_proj)
    torch.testing.assert_close(out, ref)


# ---- modules ---------------------------------------------------------------------------------------
def test_module_constructors_check_their_arguments():
    with pytest.raises(
        ValueError, match=r"hidden_act='tanh' is not allowed: use one of \['gelu', 'relu', 'silu'\]"
    ):
        MLP(32, 16, "tanh")
    with pytest.raises(ValueError, match="intermediate_size=0 is not allowed"):
        MLP(32, 0)
    with pytest.raises(ValueError, match="hidden_size=True is not allowed"):
        MLP(True, 16)
    with pytest.raises(TypeError, match="config must be a MoEConfig, got dict"):
        Experts({"hidden_size": 64})


# ---- the fused CPU layer: routing parameters the C router cannot take --------------------------------
@pytest.mark.parametrize(
    ("top_k", "n_group", "topk_group", "message"),
    [
        (9, 1, 1, "top_k=9 is not allowed: a token can choose from at most"),
        (0, 1, 1, "top_k=0 is not allowed: it must be a positive integer"),
        (-1, 1, 1, "top_k=-1 is not allowed"),
        (2, 3, 1, "n_group=3 is not allowed with 8 experts"),
        (2, 0, 1, "n_group=0 is not allowed"),
        (2, 2, 3, "topk_group=3 is not allowed: it must be between 1 and n_group=2"),
        (8, 4, 1, "top_k=8 is not allowed: a token can choose from at most .* = 2 experts"),
    ],
)
def test_layer_forward_rejects_routing_the_c_router_cannot_take(top_k, n_group, topk_group, message):
    layer = MoE(MoEConfig())
    args = (
        torch.randn(1, 64),
        layer.gate.weight.detach(),
        layer.gate.e_score_correction_bias,
        layer.experts.gate_up_proj.detach(),
        layer.experts.down_proj.detach(),
        tuple(w.detach() for w in layer.shared_experts.plain_weights()),
    )
    with pytest.raises(ValueError, match=message):
        cpu_kernel.layer_forward(*args, top_k, n_group, topk_group)  # checked before any C call


# ---- a config changed after the layer was built ------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("num_experts_per_tok", 9, "num_experts_per_tok=9 is not allowed"),
        ("num_experts_per_tok", -1, "num_experts_per_tok=-1 is not allowed"),
        ("n_group", 3, "n_group=3 is not allowed with n_routed_experts=8"),
        ("topk_group", 2, "topk_group=2 is not allowed"),
        ("dispatch", "fast", "dispatch='fast' is not allowed"),
    ],
)
def test_changing_a_config_field_is_checked_and_the_layer_keeps_running(name, value, message):
    # top_k=9 on 8 experts used to crash the process inside the fused C kernel (SIGSEGV)
    layer = MoE(MoEConfig())
    x = torch.randn(1, 64)
    before = layer(x)
    with pytest.raises(ValueError, match=message):
        setattr(layer.config, name, value)
    assert getattr(layer.config, name) == getattr(MoEConfig(), name)  # the old value kept
    torch.testing.assert_close(layer(x), before)


def test_changing_a_config_field_to_an_allowed_value_takes_effect():
    layer = MoE(MoEConfig())
    layer.config.num_experts_per_tok = 3
    _, routing = layer(torch.randn(4, 64), return_routing=True)
    assert routing.topk_indices.shape == (4, 3)


def test_dense_weights_checks_its_ids():
    from glm4moe_lib.viz.routing import dense_weights

    idx = torch.tensor([[0, 3], [7, 1]])
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    assert dense_weights(w, idx, 8)[1, 7] == 0.5
    with pytest.raises(ValueError, match=r"topk_indices holds expert ids from 0 to 8: .*\[0, 8\)"):
        dense_weights(w, idx.clamp(max=6) + torch.tensor([[0, 0], [2, 0]]), 8)
    with pytest.raises(ValueError, match="topk_weights has shape \\(2, 1\\)"):
        dense_weights(w[:, :1], idx, 8)
    with pytest.raises(ValueError, match="num_experts=0 is not allowed"):
        dense_weights(w, idx, 0)
    with pytest.raises(ValueError, match="topk_indices has dtype torch.float32"):
        dense_weights(w, idx.float(), 8)


def test_a2a_bytes_formula_checks_world_size():
    from glm4moe_lib.parallel import a2a_bytes_formula

    assert a2a_bytes_formula(64, 8, 512, 4, 2) == 64 * 8 * 512 * 2 * 3 / 4
    with pytest.raises(ValueError, match="world_size=0 is not allowed"):
        a2a_bytes_formula(64, 8, 512, 0, 2)  # was a bare ZeroDivisionError
    with pytest.raises(ValueError, match="elem_size=-1 is not allowed"):
        a2a_bytes_formula(64, 8, 512, 4, -1)


# ---- the C kernel's public entry points: dtypes it would read wrongly (a float16 MLP crashed the process)
def _mlp(dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    x, gate, up, down = (torch.randn(*s, generator=gen) for s in ((4, 64), (32, 64), (32, 64), (64, 32)))
    return tuple(t.to(dtype) for t in (x, gate, up, down))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_swiglu_mlp_rejects_dtypes_the_kernel_cannot_read(dtype):
    with pytest.raises(ValueError, match=f"x has dtype {dtype}: the fused kernel is float32 only"):
        cpu_kernel.swiglu_mlp(*_mlp(dtype))
    x, gate, up, down = _mlp()
    with pytest.raises(ValueError, match=f"down has dtype {dtype}"):
        cpu_kernel.swiglu_mlp(x, gate, up, down.to(dtype))


def test_swiglu_mlp_matches_torch():
    x, gate, up, down = _mlp()
    ref = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(cpu_kernel.swiglu_mlp(x, gate, up, down), ref, rtol=1e-4, atol=1e-4)


def test_layer_forward_rejects_dtypes_the_kernel_cannot_read():
    layer = MoE(MoEConfig())
    shared = tuple(w.detach() for w in layer.shared_experts.plain_weights())
    args = [
        torch.randn(2, 64),
        layer.gate.weight.detach(),
        layer.gate.e_score_correction_bias,
        layer.experts.gate_up_proj.detach(),
        layer.experts.down_proj.detach(),
        shared,
    ]
    for position, name in ((0, "x"), (1, "router_weight"), (3, "gate_up"), (4, "down")):
        bad = list(args)
        bad[position] = bad[position].double()
        with pytest.raises(ValueError, match=f"{name} has dtype torch.float64"):
            cpu_kernel.layer_forward(*bad, 2)
    bad = list(args)
    bad[5] = tuple(w.half() for w in shared)
    with pytest.raises(ValueError, match="shared gate has dtype torch.float16"):
        cpu_kernel.layer_forward(*bad, 2)
    out = cpu_kernel.layer_forward(*args, 2)[0]
    torch.testing.assert_close(out, layer(args[0]), rtol=1e-5, atol=1e-6)


def test_kernel_entry_points_build_the_kernel_in_a_fresh_process():
    # a first direct call used to fail with "'NoneType' object has no attribute 'mlp_forward'"
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from glm4moe_lib import cpu_kernel as ck\n"
        "x, g, u, d = torch.randn(4, 64), torch.randn(32, 64), torch.randn(32, 64), torch.randn(64, 32)\n"
        "print(ck.swiglu_mlp(x, g, u, d).shape)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if cpu_kernel.load_kernel() is None:
        assert run.returncode != 0 and "fused CPU kernel cannot run here" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert "torch.Size([4, 64])" in run.stdout


def test_fused_cpu_dispatch_rejects_float_ids():
    x, idx, w, ex = _batch()
    with pytest.raises(ValueError, match="top_k_index has dtype torch.float32: an integer"):
        cpu_kernel.fused_cpu_dispatch(x, idx.float() + 0.9, w, ex.gate_up_proj, ex.down_proj)


# ---- pick_device --------------------------------------------------------------------------------------
def test_pick_device_arguments():
    from glm4moe_lib.device import pick_device

    assert pick_device(torch.device("cpu")) == torch.device("cpu")  # was AttributeError (.lower)
    assert pick_device(" CPU ") == torch.device("cpu")
    for bad in ("", 0, "tpu"):
        with pytest.raises(ValueError, match="is not allowed"):
            pick_device(bad)
    with pytest.raises(ValueError, match="'cuda:x' is not allowed"):
        pick_device("cuda:x")
    with pytest.raises(ValueError, match="'cuda:99' was asked for, but torch finds"):
        pick_device("cuda:99")
