"""The fused CPU kernel (strategy "fused_cpu"): built here, right against the references, chosen
by "auto" only where it applies, and a clear error or a quiet fallback where it cannot run."""

from __future__ import annotations

import math
import subprocess
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

from glm4moe_lib import MLP, MoE, MoEConfig, cpu_kernel, dispatch, preset
from glm4moe_lib.dispatch import choose_strategy, dense_reference, dispatch_combine, sorted_dispatch

needs_kernel = pytest.mark.skipif(
    cpu_kernel.load_kernel() is None, reason=f"fused CPU kernel {cpu_kernel.kernel_status()}"
)


def _problem(tokens, experts, top_k, hidden, inter, skew=False, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    gu = torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    dn = torch.randn(experts, hidden, inter, generator=gen) * inter**-0.5
    p = torch.tensor([0.5**e for e in range(experts)]) + 1e-3 if skew else torch.ones(experts)
    idx = torch.multinomial(p.expand(tokens, experts), top_k, generator=gen)
    w = torch.rand(tokens, top_k, generator=gen)
    if grad:
        x, gu, dn, w = (t.requires_grad_(True) for t in (x, gu, dn, w))
    return x, idx, w, gu, dn


def _grad_close(ours, theirs, name):
    """float32 gradients equal up to summation order: an element that sums large terms that cancel
    carries an error relative to the tensor's scale, so atol scales with max|grad|."""
    scale = max(1.0, float(theirs.detach().abs().max()))
    err = float((ours - theirs).abs().max())
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * scale), f"grad of {name}: max |diff| {err:.3g}"


def test_kernel_builds_where_there_is_a_compiler():
    if cpu_kernel._compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert cpu_kernel.load_kernel() is not None, cpu_kernel.kernel_status()
    assert cpu_kernel.kernel_status().startswith("ready: ")


CASES = [  # tokens, experts, top_k, hidden, inter, skewed
    (1, 16, 4, 64, 32, False),  # one token
    (3, 8, 1, 48, 16, False),  # top-1
    (37, 16, 4, 40, 24, False),  # widths that are not multiples of 16: the scalar tails
    (37, 16, 4, 40, 24, True),  # skewed: one expert gets most pairs (many 4-row passes + a remainder)
    (300, 8, 2, 96, 48, True),
    (64, 128, 8, 512, 128, False),  # the bench layer's widths
]


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-K{}-H{}-I{}{}".format(*c[:5], "-skew" * c[5]))
def test_matches_dense_reference(case):
    x, idx, w, gu, dn = _problem(*case)
    ref = dense_reference(x, idx, w, gu, dn)
    out = dispatch_combine(x, idx, w, gu, dn, strategy="fused_cpu")
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("hidden, inter", [(64, 32), (43, 11)])
def test_a_token_gets_the_same_bits_alone_and_in_a_batch(hidden, inter):
    """Batch invariance: a token alone (one-token passes, whose rows are read in pairs) and the same
    token among many sharing its experts (passes of up to 8 tokens) give bitwise the same output."""
    x, idx, w, gu, dn = _problem(40, 4, 2, hidden, inter)  # 4 experts: every pass is full
    batch = cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn)
    for t in (0, 17, 39):
        alone = cpu_kernel.fused_cpu_dispatch(x[t : t + 1], idx[t : t + 1], w[t : t + 1], gu, dn)
        assert torch.equal(alone[0], batch[t])


@needs_kernel
@pytest.mark.parametrize("hidden, inter", [(64, 32), (43, 11), (48, 17)])
def test_every_pass_size_gives_the_same_bits(hidden, inter):
    """Passes of 1 to 9 tokens through one expert (each size takes its own code: four streams for up to
    two tokens, one row at a time for 3-4 (down's short rows two at a time with AVX-512), two rows for 5-8,
    two passes for 9) give each token bitwise the bits it gets alone; odd widths take every path's
    leftover rows and columns."""
    x, _, _, gu, dn = _problem(9, 1, 1, hidden, inter, seed=3)
    idx, w = torch.zeros(9, 1, dtype=torch.int64), torch.rand(9, 1)
    alone = [cpu_kernel.fused_cpu_dispatch(x[t : t + 1], idx[:1], w[t : t + 1], gu, dn)[0] for t in range(9)]
    assert torch.allclose(torch.stack(alone), dense_reference(x, idx, w, gu, dn), rtol=1e-5, atol=1e-5)
    for n in range(2, 10):
        together = cpu_kernel.fused_cpu_dispatch(x[:n], idx[:n], w[:n], gu, dn)
        for t in range(n):
            assert torch.equal(together[t], alone[t]), f"token {t} of a pass of {n}"


@needs_kernel
def test_silu_over_the_whole_float_range():
    """The kernel's own e^x (16 at a time) against torch's silu: gate pre-activations from about -1e4 to
    1e4 (e^x overflows and underflows), infinities (silu(-inf) is NaN in torch: -inf * 0) and NaN."""
    x, idx, w, gu, dn = _problem(40, 4, 2, 48, 40, seed=5)
    x = x * torch.logspace(-2, 3, 40)[:, None]  # row t scaled by 10^(-2 .. 3)
    x[7, 5], x[8, 9], x[9, 0] = float("inf"), float("-inf"), float("nan")
    out = cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn)
    ref = dense_reference(x, idx, w, gu, dn)
    assert ref[9].isnan().all() and ref[7].isnan().any()  # the cases are there
    torch.testing.assert_close(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.isinf(), ref.isinf())
    finite = ref.isfinite().all(dim=1)  # rows of 10^3: float32 sums carry 1e-5 of the row's scale
    scale = ref[finite].abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(out[finite] / scale, ref[finite] / scale, rtol=1e-5, atol=2e-6)


def _threads_used(openmp: bool):
    """Run the kernel's parallel calls on torch's OpenMP threads (openmp) or on Python's pool only:
    the other route raises, so a test that passes took the one it names."""

    def no_pool(*args, **kwargs):
        if cpu_kernel._threads(args[3]) > 1:  # (one, claimed, offsets, pairs, ...)
            raise AssertionError("the Python pool ran where the OpenMP call should have")
        return parallel(*args, **kwargs)

    parallel = cpu_kernel._parallel
    if openmp:
        if not cpu_kernel._openmp:
            pytest.skip("the kernel does not share torch's OpenMP runtime here")
        return patch.object(cpu_kernel, "_parallel", no_pool)
    return patch.object(cpu_kernel, "_openmp", False)


@needs_kernel
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "pool"])
def test_same_result_with_any_thread_count(openmp):
    x, idx, w, gu, dn = _problem(600, 16, 4, 64, 32, skew=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn)
        torch.set_num_threads(3)  # three expert ranges, run by three threads
        assert len(cpu_kernel._chunks(torch.tensor([0, 900, 1500, 2000, 2400]), 3)) == 3
        with _threads_used(openmp):
            many = cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)  # each pair is computed alone, the K slots summed in one order


@needs_kernel
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "pool"])
@pytest.mark.parametrize("owner", [0, 2])
def test_experts_left_by_a_slow_thread_are_taken_over_with_the_same_bits(owner, openmp, idle_thread):
    """The experts' forward and backward on three threads (torch's OpenMP ones, or Python's pool), one
    of which claims none of its own range: the others run those experts, and the output and every
    gradient keep the bits of one thread."""
    threads = torch.get_num_threads()

    def run():
        x, idx, w, gu, dn = _problem(600, 16, 4, 64, 32, skew=True, grad=True)
        out = cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn)
        out.backward(torch.ones_like(out))
        return [out, x.grad, w.grad, gu.grad, dn.grad]

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(3)
        with idle_thread(owner) as taken_over, _threads_used(openmp):
            three = run()
            moved = taken_over()
    finally:
        torch.set_num_threads(threads)
    assert moved > 0, "no expert was taken over from the idle thread"
    for a, b in zip(one, three, strict=True):
        assert torch.equal(a, b)


@needs_kernel
@pytest.mark.skipif(
    not (__import__("sys").platform.startswith("linux") and torch._C.has_openmp),
    reason="the OpenMP build applies on Linux where torch runs on GNU OpenMP",
)
def test_the_kernel_runs_on_torchs_own_openmp_threads(tmp_path):
    # built with -fopenmp, its libgomp.so.1 is the one torch loaded: one runtime, one set of threads
    # (a second runtime's threads would compete with torch's for the cores)
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    done = subprocess.run(
        [cpu_kernel._compiler(), "-fopenmp", str(probe), "-o", str(tmp_path / "probe")], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("this C compiler cannot build with -fopenmp")
    assert cpu_kernel._openmp and cpu_kernel._lib.moe_openmp() == 1 and cpu_kernel.on_torch_threads()
    assert len(cpu_kernel._gomp_paths()) == 1, cpu_kernel._gomp_paths()


@needs_kernel
def test_expert_ranges_cover_every_expert_once():
    offsets = torch.tensor([0, 0, 10, 10, 11, 50, 50, 60])  # 7 experts, 60 pairs
    for parts in (1, 2, 3, 7, 10):
        for backward in (False, True):
            ranges = cpu_kernel._chunks(offsets, parts, backward)
            assert ranges[0][0] == 0 and ranges[-1][1] == 7
            assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))


@needs_kernel
def test_expert_ranges_split_the_cost_not_the_pairs():
    # one hot expert with 40 pairs, then 20 with one each: by pairs the first thread would take the hot
    # one alone and the second all 20 to read; each expert's reading costs as much as 3 pairs
    offsets = torch.tensor([0, 40, *range(41, 61)])
    assert cpu_kernel._chunks(offsets, 2) == [(0, 6), (6, 21)]  # (40+3) + 5 x (1+3) = 63 of 123
    # the backward also writes the untouched experts' zero gradients (2 pairs' worth each)
    idle = torch.tensor([0, 8, 8, 8, 8, 8, 16])  # 6 experts: touched, 4 untouched, touched
    assert cpu_kernel._chunks(idle, 2) == [(0, 1), (1, 6)]
    assert cpu_kernel._chunks(idle, 2, backward=True) == [(0, 3), (3, 6)]  # (8+3) + 2 + 2 = 15 of 30


@needs_kernel
@pytest.mark.parametrize("skew", [False, True])
def test_gradients_equal_dense_reference(skew):
    x, idx, w, gu, dn = _problem(23, 16, 4, 40, 24, skew=skew, grad=True)
    g_out = torch.randn(23, 40)
    out = dispatch_combine(x, idx, w, gu, dn, strategy="fused_cpu")
    ref = dense_reference(x, idx, w, gu, dn)
    grads = torch.autograd.grad(out, (x, w, gu, dn), g_out)
    refs = torch.autograd.grad(ref, (x, w, gu, dn), g_out)
    for name, a, b in zip(("x", "weights", "gate_up", "down"), grads, refs):
        _grad_close(a, b, name)


@needs_kernel
def test_gradient_of_the_input_alone():
    x, idx, w, gu, dn = _problem(5, 8, 2, 32, 16)
    x.requires_grad_(True)
    out = cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn)
    (gx,) = torch.autograd.grad(out.sum(), x)
    (ref,) = torch.autograd.grad(sorted_dispatch(x, idx, w, gu, dn).sum(), x)
    torch.testing.assert_close(gx, ref, rtol=1e-4, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("grad", [False, True])
def test_layer_matches_transformers(grad):
    cfg = MoEConfig(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
                    n_group=4, topk_group=2, routed_scaling_factor=2.5, dispatch="fused_cpu")  # fmt: skip
    torch.manual_seed(0)
    hf = Glm4MoeMoE(cfg.to_hf())
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.3)
        hf.gate.e_score_correction_bias.normal_(std=0.3)
    moe = MoE(cfg)
    moe.load_state_dict(hf.state_dict())
    x = torch.randn(2, 9, 64)
    with torch.set_grad_enabled(grad):
        x_hf, x_ours = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
        y_hf, y_ours = hf(x_hf), moe(x_ours)
    torch.testing.assert_close(y_ours, y_hf, rtol=1e-5, atol=1e-5)  # outputs ~30: float32 rounding
    if grad:
        g = torch.randn_like(y_hf)
        y_hf.backward(g)
        y_ours.backward(g)
        torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(moe.experts.gate_up_proj.grad, hf.experts.gate_up_proj.grad, rtol=1e-4,
                                   atol=1e-5)  # fmt: skip


@needs_kernel
def test_auto_picks_it_for_float32_at_small_batches():
    moe = MoE(preset("bench")).eval()
    x = lambda t: torch.zeros(t, 512)  # noqa: E731
    idx = lambda t: torch.zeros(t, 8, dtype=torch.long)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            for t in (1, 16, 256, 512, 4096, 8192):  # inference: at every T (measured to 8192)
                assert choose_strategy(x(t), idx(t), 128) == "fused_cpu"
                assert choose_strategy(x(t), idx(t), 128, F.silu) == "fused_cpu"
            assert choose_strategy(x(16), idx(16), 128, F.gelu) != "fused_cpu"  # SiLU only
            assert choose_strategy(x(16).bfloat16(), idx(16), 128) != "fused_cpu"  # float32 only
            with patch.object(dispatch, "FUSED_CPU_MAX_PAIRS_PER_EXPERT", ((math.inf, 32),)):  # per thread
                assert choose_strategy(x(512), idx(512), 128) == "fused_cpu"
                assert choose_strategy(x(513), idx(513), 128) != "fused_cpu"
                torch.set_num_threads(2)
                assert choose_strategy(x(1024), idx(1024), 128) == "fused_cpu"  # 2 threads: up to 64·E
                assert choose_strategy(x(1025), idx(1025), 128) != "fused_cpu"
            torch.set_num_threads(2)
            assert choose_strategy(x(4096), idx(4096), 128) == "fused_cpu"
            torch.set_num_threads(1)
            # wider layers: the BLAS wins from fewer rows per expert (32 pairs per expert up to H=1024, then 8)
            wide = lambda t, h: torch.zeros(t, h)  # noqa: E731
            assert choose_strategy(wide(256, 1024), idx(256), 64) == "fused_cpu"  # 32 pairs per expert
            assert choose_strategy(wide(257, 1024), idx(257), 64) != "fused_cpu"
            assert choose_strategy(wide(128, 2048), idx(128), 128) == "fused_cpu"  # 8 pairs per expert
            assert choose_strategy(wide(129, 2048), idx(129), 128) != "fused_cpu"
            with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast asks for bf16 math
                assert choose_strategy(x(16), idx(16), 128) != "fused_cpu"
        torch.set_num_threads(1)
        for t in (1, 16, 2048):  # with gradients: T·K <= 128·E (its backward is one more pass)
            assert choose_strategy(x(t), idx(t), 128) == "fused_cpu"
        assert choose_strategy(x(2049), idx(2049), 128) != "fused_cpu"
        assert choose_strategy(torch.zeros(512, 1024), idx(512), 128) == "fused_cpu"  # H=1024: 32 per expert
        assert choose_strategy(torch.zeros(513, 1024), idx(513), 128) != "fused_cpu"
        assert choose_strategy(torch.zeros(128, 2048), idx(128), 128) == "fused_cpu"  # wider: 8 per expert
        assert choose_strategy(torch.zeros(129, 2048), idx(129), 128) != "fused_cpu"
        torch.set_num_threads(2)
        assert choose_strategy(x(4096), idx(4096), 128) == "fused_cpu"
        assert choose_strategy(x(4097), idx(4097), 128) != "fused_cpu"
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():  # and the layer's "auto" output is the kernel's
        xs = torch.randn(5, 512)
        r = moe.gate(xs)
        out = moe.experts(xs, r.topk_indices, r.topk_weights)
        assert torch.equal(out, cpu_kernel.fused_cpu_dispatch(xs, r.topk_indices, r.topk_weights,
                                                              moe.experts.gate_up_proj, moe.experts.down_proj))  # fmt: skip


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    assert cpu_kernel.load_kernel() is None
    assert cpu_kernel.kernel_status() == "off (GLM4MOE_CPU_KERNEL=0)"
    with torch.no_grad():
        assert choose_strategy(torch.zeros(1, 64), torch.zeros(1, 2, dtype=torch.long), 16) == "gather_bmm"
    x, idx, w, gu, dn = _problem(4, 8, 2, 32, 16)
    with pytest.raises(ValueError, match=r"strategy='fused_cpu' cannot run here: .*GLM4MOE_CPU_KERNEL=0"):
        dispatch_combine(x, idx, w, gu, dn, strategy="fused_cpu")


@needs_kernel
def test_bad_inputs_get_clear_errors():
    x, idx, w, gu, dn = _problem(4, 8, 2, 32, 16)
    bad = idx.clone()
    bad[2, 1] = 8
    with pytest.raises(
        ValueError, match=r"top_k_index holds expert id 8 \(token 2\): ids must lie in \[0, 8\)"
    ):
        cpu_kernel.fused_cpu_dispatch(x, bad, w, gu, dn)
    with pytest.raises(
        ValueError, match=r"hidden_states has dtype torch.bfloat16: the fused kernel is float32"
    ):
        dispatch_combine(x.bfloat16(), idx, w, gu.bfloat16(), dn.bfloat16(), strategy="fused_cpu")
    with pytest.raises(ValueError, match=r"act_fn='gelu': the fused kernel implements SiLU only"):
        dispatch_combine(x, idx, w, gu, dn, F.gelu, strategy="fused_cpu")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"is on cuda:0: the fused kernel runs on the CPU only"):
            dispatch_combine(x.cuda(), idx.cuda(), w.cuda(), gu.cuda(), dn.cuda(), strategy="fused_cpu")
    # int32 ids and non-contiguous inputs are accepted (made contiguous int64 first)
    out = cpu_kernel.fused_cpu_dispatch(x.t().contiguous().t(), idx.int(), w, gu, dn)
    torch.testing.assert_close(out, dense_reference(x, idx, w, gu, dn), rtol=1e-5, atol=1e-5)
    assert cpu_kernel.fused_cpu_dispatch(x[:0], idx[:0], w[:0], gu, dn).shape == (0, 32)


def _replaced(shapes: dict[str, tuple[int, ...]]) -> MoE:
    """The bench layer with some weights' data replaced by random tensors of other shapes."""
    moe = MoE(preset("bench"))
    for path, shape in shapes.items():
        *parents, name = path.split(".")
        owner = moe
        for parent in parents:
            owner = getattr(owner, parent)
        getattr(owner, name).data = torch.randn(shape)
    return moe


PRUNED = {"experts.gate_up_proj": (64, 256, 512), "experts.down_proj": (64, 512, 128)}  # 64 of 128


@pytest.mark.parametrize(
    "shapes, tokens, grad, match",
    [
        # the whole layer in one C call (a few tokens, inference)
        ({"experts.down_proj": (64, 512, 128)}, 2, False, r"down_proj \(64, 512, 128\) do not fit together"),
        (
            {"experts.gate_up_proj": (128, 256, 256)},
            2,
            False,
            r"gate_up_proj \(128, 256, 256\) and down_proj",
        ),
        ({"gate.e_score_correction_bias": (64,)}, 2, False, r"e_score_correction_bias\) has shape \(64,\)"),
        ({"shared_experts.down_proj.weight": (512, 64)}, 2, False, r"down has shape \(512, 64\)"),
        # the same with gradients (the training call's checks hand them to the modules, which raise)
        ({"experts.down_proj": (64, 512, 128)}, 2, True, r"down_proj \(64, 512, 128\) do not fit together"),
        ({"experts.gate_up_proj": (128, 256, 256)}, 2, True, r"gate_up_proj \(128, 256, 256\) and down_proj"),
        ({"gate.e_score_correction_bias": (64,)}, 2, True, r"e_score_correction_bias\) has shape \(64,\)"),
        ({"shared_experts.down_proj.weight": (512, 64)}, 2, True, r"down has shape \(512, 64\)"),
        (PRUNED, 2, True, r"the router scores 128 experts .* holds 64"),
        # the experts through the kernel (more tokens), with and without gradients
        ({"experts.down_proj": (128, 512, 64)}, 64, False, r"do not fit together: they must be \[E, 2I, H\]"),
        ({"experts.down_proj": (128, 512, 64)}, 64, True, r"do not fit together"),
        # the router and the experts disagree on E
        (
            PRUNED,
            2,
            False,
            r"router weight \(gate.weight\) has shape \(128, 512\): it must be \(64, 512\)|scores 128 .* holds 64",
        ),
        (PRUNED, 64, False, r"the router scores 128 experts .* holds 64"),
        (PRUNED, 64, True, r"the router scores 128 experts .* holds 64"),
    ],
)
def test_weights_replaced_with_other_shapes_get_clear_errors(shapes, tokens, grad, match):
    """A weight replaced through ``.data`` by one of another shape is a clear error, never a read
    past the end of a tensor in the C code (which crashed the interpreter before these checks)."""
    moe = _replaced(shapes)
    x = torch.randn(tokens, 512, requires_grad=grad)
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=match):
        moe(x).sum().backward()


def test_every_strategy_checks_the_expert_shapes():
    x, idx, w, gu, dn = _problem(4, 8, 2, 32, 16)
    for strategy in ("loop", "sorted", "fused_cpu"):
        with pytest.raises(ValueError, match=r"gate_up_proj \(8, 32, 32\) and down_proj \(8, 32, 8\)"):
            dispatch_combine(x, idx, w, gu, dn[..., :8], strategy=strategy)
        with pytest.raises(
            ValueError, match=r"hidden_states has shape \(4, 16\): it must be \[tokens, H=32\]"
        ):
            dispatch_combine(x[:, :16], idx, w, gu, dn, strategy=strategy)


@pytest.mark.parametrize("tokens, grad", [(1, False), (64, False), (2, True)])
def test_mlp_checks_shapes_on_every_path(tokens, grad):
    mlp = MLP(64, 32)
    mlp.up_proj.weight.data = torch.randn(16, 64)
    with (
        torch.set_grad_enabled(grad),
        pytest.raises(ValueError, match=r"up has shape \(16, 64\): it must be \(32, 64\)"),
    ):
        mlp(torch.randn(tokens, 64))
    with pytest.raises(ValueError, match=r"x has shape \(2, 48\): its last dimension must be 64"):
        MLP(64, 32)(torch.randn(2, 48))


def test_router_bias_of_another_shape_is_an_error_not_a_broadcast():
    moe = MoE(preset("bench"))
    moe.gate.e_score_correction_bias.data = torch.zeros(1)  # would broadcast over the 128 experts
    with pytest.raises(ValueError, match=r"has shape \(1,\): expected \[n_routed_experts=128\]"):
        moe.gate(torch.randn(64, 512))


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """A cold cache in tmp_path, and no kernel loaded yet (restored afterwards)."""
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_why_not", None)
    monkeypatch.setattr(cpu_kernel, "_openmp", False)
    monkeypatch.setenv(cpu_kernel.ENV_CACHE, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_without_openmp_the_kernel_still_builds_and_splits_with_python_threads(
    fresh_kernel_state, monkeypatch, tmp_path
):
    compiler = cpu_kernel._compiler()
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    no_openmp = tmp_path / "cc-no-openmp"  # a compiler that cannot build with -fopenmp
    no_openmp.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "no OpenMP here" >&2; exit 1; }}; done\n'
        f'exec {compiler} "$@"\n'
    )
    no_openmp.chmod(0o755)
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: str(no_openmp))
    assert cpu_kernel.load_kernel() is not None and not cpu_kernel._openmp
    assert cpu_kernel._lib.moe_openmp() == 0
    monkeypatch.setattr(cpu_kernel, "_lib", None)  # the next process: neither build is tried again

    def no_build(*args):
        raise AssertionError("a cached library or a cached failure should have been used")

    monkeypatch.setattr(cpu_kernel, "_build", no_build)
    assert cpu_kernel.load_kernel() is not None and not cpu_kernel._openmp
    x, idx, w, gu, dn = _problem(600, 16, 4, 64, 32, skew=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn)
        torch.set_num_threads(2)
        two = cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn)  # the Python pool's two ranges
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_a_failed_build_falls_back_and_says_why(fresh_kernel_state, monkeypatch, tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no such thing' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: str(broken))
    assert cpu_kernel.load_kernel() is None
    assert "could not build moe_cpu.c: cc: fatal error: no such thing" in cpu_kernel.kernel_status()
    left = [p.name for p in fresh_kernel_state.iterdir()]  # no half-written library left behind
    assert all(name.endswith(".failed") for name in left), left  # (only the note not to try -fopenmp again)
    with torch.no_grad():
        assert choose_strategy(torch.zeros(1, 64), torch.zeros(1, 2, dtype=torch.long), 16) == "gather_bmm"
    x, idx, w, gu, dn = _problem(4, 8, 2, 32, 16)
    with pytest.raises(ValueError, match="could not build moe_cpu.c"):
        dispatch_combine(x, idx, w, gu, dn, strategy="fused_cpu")
    moe = MoE(MoEConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2))
    with torch.no_grad():  # the layer's "auto" still works, through the torch strategies
        routing = moe.gate(x)
        routed = moe.experts(x, routing.topk_indices, routing.topk_weights, strategy="sorted")
        torch.testing.assert_close(moe(x), routed + moe.shared_experts(x))


def test_no_compiler_falls_back(fresh_kernel_state, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    assert cpu_kernel.load_kernel() is None
    assert (
        cpu_kernel.kernel_status() == "not available: no C compiler found (set CC, or install gcc or clang)"
    )


def test_build_is_cached(fresh_kernel_state, monkeypatch):
    if cpu_kernel._compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert cpu_kernel.load_kernel() is not None
    built = sorted(p.name for p in fresh_kernel_state.iterdir())
    assert not any(name.endswith(".tmp") for name in built)
    libraries = [name for name in built if not name.endswith(".failed")]  # (.failed: no -fopenmp build here)
    assert len(libraries) == 1 and libraries[0].startswith("moe_cpu-")
    monkeypatch.setattr(cpu_kernel, "_lib", None)

    def no_rebuild(*args):
        raise AssertionError("the cached library should have been used")

    monkeypatch.setattr(cpu_kernel, "_build", no_rebuild)
    assert cpu_kernel.load_kernel() is not None


def test_not_traced_by_torch_compile():
    assert not dispatch._compiles("fused_cpu", torch.device("cpu"))


def test_source_ships_with_the_package():
    assert cpu_kernel.SOURCE.is_file() and "moe_experts" in cpu_kernel.SOURCE.read_text()


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 40), (4, 40), (2, 2, 40), (1, 1, 512)])
def test_shared_mlp_fast_path_matches_torch(shape):
    torch.manual_seed(0)
    mlp = MLP(shape[-1], 24 if shape[-1] == 40 else 128)
    x = torch.randn(*shape)
    ref = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))  # the torch ops
    weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    with torch.no_grad():
        assert cpu_kernel.mlp_applies(x, *weights, mlp.act_fn)
        out = mlp(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)


def test_shared_mlp_fast_path_only_where_it_applies():
    mlp = MLP(40, 24)
    weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    x = torch.randn(3, 40)
    assert not cpu_kernel.mlp_applies(x, *weights, mlp.act_fn)  # gradients wanted: torch ops
    out = mlp(x.requires_grad_(True))
    out.sum().backward()
    assert x.grad is not None and mlp.gate_proj.weight.grad is not None
    with torch.no_grad():
        assert not cpu_kernel.mlp_applies(torch.randn(5, 40), *weights, mlp.act_fn)  # > 4 tokens
        assert not cpu_kernel.mlp_applies(x, *weights, F.gelu)
        assert not cpu_kernel.mlp_applies(x.bfloat16(), *(w.bfloat16() for w in weights), mlp.act_fn)


@needs_kernel
def test_flop_counters_and_transforms_see_the_torch_ops():
    from torch.utils.flop_counter import FlopCounterMode

    moe = MoE(MoEConfig(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=2))
    x = torch.randn(1, 64)
    with torch.no_grad():
        routing = moe.gate(x)
        assert choose_strategy(x, routing.topk_indices, 16) == "fused_cpu"
        with FlopCounterMode(display=False) as counter:
            assert choose_strategy(x, routing.topk_indices, 16) != "fused_cpu"
            moe(x)
    # router 2·H·E, the shared expert 3·2·H·I and K routed experts 3·2·H·I each
    assert counter.get_total_flops() == 2 * 64 * 16 + 6 * 64 * 32 + 2 * 6 * 64 * 32
    with pytest.raises(ValueError, match="FlopCounterMode is active"), FlopCounterMode(display=False):
        cpu_kernel.fused_cpu_dispatch(x, routing.topk_indices, routing.topk_weights,
                                      moe.experts.gate_up_proj, moe.experts.down_proj)  # fmt: skip
    with torch.no_grad():  # under vmap the tensors are wrapped: the torch ops run
        out = torch.func.vmap(moe)(x.expand(3, 1, 64))
    torch.testing.assert_close(out, moe(x).detach().expand(3, 1, 64), rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize(
    "case",
    [
        (300, 8, 2, 96, 48, True),
        (64, 128, 8, 512, 128, False),
        (90, 6, 3, 42, 13, True),  # H and 2I not multiples of the 4-row blocks: the leftover rows
        (60, 4, 2, 43, 11, True),  # odd H: a down row left over after the row pairs of later blocks
    ],
    ids=str,
)
def test_backward_kernel_equals_dense_reference_on_bigger_batches(case):
    x, idx, w, gu, dn = _problem(*case, grad=True)
    g_out = torch.randn_like(x)
    grads = torch.autograd.grad(cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn), (x, w, gu, dn), g_out)
    refs = torch.autograd.grad(sorted_dispatch(x, idx, w, gu, dn), (x, w, gu, dn), g_out)
    for name, a, b in zip(("x", "weights", "gate_up", "down"), grads, refs):
        _grad_close(a, b, name)
    unused = sorted(set(range(case[1])) - set(idx.flatten().tolist()))
    assert all(grads[2][e].abs().max() == 0 and grads[3][e].abs().max() == 0 for e in unused)


@needs_kernel
@pytest.mark.parametrize("hidden, inter", [(40, 24), (512, 128), (37, 19)])
def test_backward_at_the_block_boundaries(hidden, inter):
    """Experts with 8 tokens (one block), 9 (blocks of 4: 4, 4, 1), 5, 1 and none, with widths that
    leave columns after the vector strips (40, 24, 37, 19) or that fill several tiles of rows (512)."""
    counts = [8, 9, 5, 1, 0]
    idx = torch.cat([torch.full((n,), e) for e, n in enumerate(counts)])[torch.randperm(23)].unsqueeze(1)
    x, _, w, gu, dn = _problem(23, len(counts), 1, hidden, inter, grad=True)
    g_out = torch.randn_like(x)
    grads = torch.autograd.grad(cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn), (x, w, gu, dn), g_out)
    refs = torch.autograd.grad(dense_reference(x, idx, w, gu, dn), (x, w, gu, dn), g_out)
    for name, a, b in zip(("x", "weights", "gate_up", "down"), grads, refs):
        _grad_close(a, b, name)
    assert grads[2][4].abs().max() == 0 and grads[3][4].abs().max() == 0


@needs_kernel
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "pool"])
def test_backward_same_with_any_thread_count_and_only_the_asked_gradients(openmp):
    x, idx, w, gu, dn = _problem(400, 16, 4, 64, 32, skew=True, grad=True)
    g_out = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.autograd.grad(cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn), (x, w, gu, dn), g_out)
        torch.set_num_threads(3)
        with _threads_used(openmp):
            many = torch.autograd.grad(
                cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn), (x, w, gu, dn), g_out
            )
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))
    frozen = gu.detach()  # a frozen weight: no gradient asked for it
    out = cpu_kernel.fused_cpu_dispatch(x, idx, w, frozen, dn)
    gx, gdn = torch.autograd.grad(out, (x, dn), g_out)
    torch.testing.assert_close(gx, one[0])
    torch.testing.assert_close(gdn, one[3])


@needs_kernel
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_threads_work_in_a_forked_child():
    import multiprocessing as mp

    x, idx, w, gu, dn = _problem(400, 16, 4, 64, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # the parent's threads exist now: torch's OpenMP ones (where the kernel shares them), else a pool
        expected = cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn)
    finally:
        torch.set_num_threads(threads)
    assert cpu_kernel._openmp or cpu_kernel._pool is not None
    # the child must not use libgomp's threads (they do not survive a fork: it would hang) but make
    # its own pool
    with mp.get_context("fork").Pool(1) as pool:
        on_torch_threads, got = pool.apply_async(_fused_in_child, (x, idx, w, gu, dn)).get(timeout=60)
    assert torch.equal(torch.tensor(got), expected) and not on_torch_threads


def _fused_in_child(x, idx, w, gu, dn):
    # Not torch.set_num_threads(2): torch's own OpenMP pool hangs in a forked child of a process
    # that used it (a libgomp limitation); the kernel's split only asks how many threads to use.
    torch.get_num_threads = lambda: 2
    out = cpu_kernel.fused_cpu_dispatch(x, idx, w, gu, dn).tolist()  # plain data back, not shared memory
    return cpu_kernel.on_torch_threads(), out
