"""The whole MoE layer through the C kernel (``MoE._fused_cpu_forward``): float32 CPU work at
small batches runs the router, the experts, the shared expert and the combine in C (with gradients,
the backward too). It must give what the modules give (and transformers' layer, outputs and
gradients), route exactly as torch does, hand ties back to torch, and stand aside wherever the
modules must run (routing returned with gradients, hooks, softmax, other sizes)."""

from __future__ import annotations

import threading
from unittest.mock import patch

import pytest
import torch
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

from glm4moe_lib import MoE, MoEConfig, cpu_kernel, preset

pytestmark = pytest.mark.skipif(
    cpu_kernel.load_kernel() is None, reason=f"fused CPU kernel {cpu_kernel.kernel_status()}"
)

# the kernel's calls on several of torch's OpenMP threads (the kernel is loaded: see pytestmark)
needs_openmp = pytest.mark.skipif(
    not cpu_kernel._openmp, reason="the kernel does not share torch's OpenMP runtime here"
)

CONFIGS = {  # the library's presets, with widths that are not multiples of 16 where it matters
    "plain": preset(
        "tiny", hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4
    ),
    "grouped": preset("small", hidden_size=40, moe_intermediate_size=24),  # n_group=4, topk_group=2, x2.5
    "unnormalised-no-shared": preset(
        "tiny", hidden_size=48, norm_topk_prob=False, n_shared_experts=0, routed_scaling_factor=1.7
    ),
    "top-1": preset("tiny", num_experts_per_tok=1),
}


def _layers(cfg: MoEConfig, seed: int = 0) -> tuple[MoE, Glm4MoeMoE]:
    torch.manual_seed(seed)
    hf = Glm4MoeMoE(cfg.to_hf())
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.3)
        hf.gate.e_score_correction_bias.normal_(std=0.1)  # a selection bias that changes choices
    moe = MoE(cfg).eval()
    ours = moe.state_dict()  # without shared experts, transformers keeps zero-width ones
    moe.load_state_dict({k: v for k, v in hf.state_dict().items() if k in ours})
    return moe, hf


def _modules_path(moe: MoE, x: torch.Tensor):
    """The layer as its modules compute it (torch router), for comparison."""
    routing = moe.gate(x)
    out = moe.experts(x, routing.topk_indices, routing.topk_weights)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out, routing


@pytest.fixture
def one_thread():
    """torch on one thread (the one-call path then runs on one thread: see layer_threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spy(monkeypatch, name: str) -> list[bool]:
    """Counts the layer's trips through ``cpu_kernel.<name>`` (and whether each returned a result)."""
    seen: list[bool] = []
    real = getattr(cpu_kernel, name)

    def spy(*args, **kwargs):
        done = real(*args, **kwargs)
        seen.append(done is not None)
        return done

    monkeypatch.setattr(cpu_kernel, name, spy)
    return seen


@pytest.fixture
def calls(monkeypatch):
    """The inference C call, cpu_kernel.layer_call."""
    return _spy(monkeypatch, "layer_call")


@pytest.fixture
def train_calls(monkeypatch):
    """The training C call, cpu_kernel.layer_train_call."""
    return _spy(monkeypatch, "layer_train_call")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' 0-wide shared MLP
@pytest.mark.parametrize("tokens", [1, 3, 8, cpu_kernel.LAYER_MAX_TOKENS])
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_the_modules_and_transformers(name, tokens, calls, one_thread):
    moe, hf = _layers(CONFIGS[name])
    x = torch.randn(tokens, moe.config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        out, routing = moe(x, return_routing=True)
        ref, ref_routing = _modules_path(moe, x)
        y_hf = hf(x.unsqueeze(0)).squeeze(0)
        _, hf_weights, hf_idx = hf.gate(x)
    assert calls == [True], "the fused layer did not run"
    assert torch.equal(routing.topk_indices, ref_routing.topk_indices)  # the same experts, same order
    torch.testing.assert_close(routing.logits, ref_routing.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.scores, ref_routing.scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(routing.topk_weights, ref_routing.topk_weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, y_hf, rtol=1e-5, atol=1e-5)
    assert torch.equal(routing.topk_indices.sort(-1).values, hf_idx.sort(-1).values)
    torch.testing.assert_close(routing.topk_weights.gather(1, routing.topk_indices.argsort(-1)),
                               hf_weights.gather(1, hf_idx.argsort(-1)), rtol=1e-6, atol=1e-7)  # fmt: skip


def test_bench_layer_and_leading_dimensions(calls):
    moe = MoE(preset("bench")).eval()
    x = torch.randn(2, 3, 512)
    with torch.no_grad():
        out = moe(x)
        ref, _ = _modules_path(moe, x.reshape(-1, 512))
    assert calls == [True] and out.shape == x.shape
    torch.testing.assert_close(out.reshape(-1, 512), ref, rtol=1e-5, atol=1e-5)


def test_a_few_tokens_on_as_many_threads_as_pairs_pay_for(calls):
    """Beyond LAYER_MAX_TOKENS the modules run the layer; with pairs enough for two threads the one
    call runs on two of torch's OpenMP threads where the kernel shares them, else the modules do
    (their experts' ranges then on Python threads)."""
    moe, _ = _layers(CONFIGS["grouped"])
    threads = torch.get_num_threads()
    most = cpu_kernel.LAYER_MAX_TOKENS
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            moe(torch.randn(most, 40))
            assert calls == [True]
            moe(torch.randn(most + 1, 40))
            assert calls == [True]
            assert cpu_kernel.layer_threads(most, 8) == 1 and cpu_kernel.layer_threads(most + 1, 8) == 0
            torch.set_num_threads(2)
            least = cpu_kernel.MIN_PAIRS_PER_OPENMP_THREAD  # on torch's OpenMP threads
            assert cpu_kernel.layer_threads(1, 2 * least - 1) == 1  # one thread's worth of pairs
            assert cpu_kernel.layer_threads(1, 2 * least) == (2 if cpu_kernel._openmp else 1)
            assert cpu_kernel.layer_threads(8, 16) == (2 if cpu_kernel._openmp else 0)  # 128 pairs
            assert cpu_kernel.layer_threads(most + 1, 8) == 0
            assert cpu_kernel.layer_train_threads(8, 16) == (2 if cpu_kernel._openmp else 0)
            assert cpu_kernel.layer_train_threads(cpu_kernel.TRAIN_MAX_TOKENS + 1, 1) == 0
            more, yes = cpu_kernel.TRAIN_MAX_TOKENS_THREADED, lambda pairs, inference: True  # noqa: E731
            assert cpu_kernel.layer_train_threads(more, 8, yes) == (2 if cpu_kernel._openmp else 0)
            assert cpu_kernel.layer_train_threads(more + 1, 8, yes) == 0
            with patch.object(cpu_kernel, "_openmp", False):  # else Python threads, from 64 pairs each
                assert cpu_kernel.layer_threads(8, 8) == 1 and cpu_kernel.layer_threads(8, 16) == 0
    finally:
        torch.set_num_threads(threads)


@needs_openmp
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' 0-wide shared MLP
@pytest.mark.parametrize("name", CONFIGS)
def test_two_threads_give_the_bits_of_one(name, calls):
    moe, _ = _layers(CONFIGS[name])
    top_k, threads = moe.config.num_experts_per_tok, torch.get_num_threads()
    # from the fewest tokens that give two threads to LAYER_MAX_TOKENS, and counts that split unevenly
    # (below RB tokens one thread routes them all and runs the shared expert, both share the experts)
    first = -(-2 * cpu_kernel.MIN_PAIRS_PER_OPENMP_THREAD // top_k)
    most = cpu_kernel.LAYER_MAX_TOKENS
    counts = sorted(t for t in {first, first + 1, first + 9, most - 1, most} if first <= t <= most)
    if not counts:
        pytest.skip(f"top-{top_k}: up to {most} tokens are one thread's worth of pairs")
    try:
        for tokens in counts:
            x = torch.randn(tokens, moe.config.hidden_size, generator=torch.Generator().manual_seed(tokens))
            with torch.no_grad():
                torch.set_num_threads(1)
                one, one_routing = moe(x, return_routing=True)
                torch.set_num_threads(2)
                assert cpu_kernel.layer_threads(tokens, top_k) == 2
                two, two_routing = moe(x, return_routing=True)
                two_out = moe(x)  # without the routing: its outputs stay in the C scratch
                torch.set_num_threads(3)  # (more threads than this machine may have cores: still the same)
                three = moe(x)
            for a, b in zip((one, *one_routing), (two, *two_routing)):
                assert torch.equal(a, b), f"T={tokens}: two threads changed the result"
            assert torch.equal(two_out, one) and torch.equal(three, one)
    finally:
        torch.set_num_threads(threads)
    assert calls == [True] * 4 * len(counts)


@needs_openmp
def test_more_tokens_on_several_threads_where_the_experts_take_the_kernel(calls):
    moe = MoE(preset("bench")).eval()
    # a wide layer whose experts the BLAS takes at this many pairs per expert (see dispatch)
    wide = MoE(
        MoEConfig(hidden_size=2048, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4)
    )
    threads, most = torch.get_num_threads(), cpu_kernel.LAYER_MAX_TOKENS_THREADED
    gate, experts = moe.gate, moe.experts
    weights = (gate.weight, gate.e_score_correction_bias, experts.gate_up_proj, experts.down_proj)
    try:
        torch.set_num_threads(2)
        for tokens in (cpu_kernel.LAYER_MAX_TOKENS + 1, most):
            x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens))
            with torch.no_grad():
                out, routing = moe(x, return_routing=True)
                one = cpu_kernel.layer_call(
                    x, *weights, moe.shared_experts.plain_weights(), 8, 1, 1, True, 1.0
                )
            assert calls[-2:] == [True, True], f"T={tokens}: the one call did not run on two threads"
            for a, b in zip((out, *routing), one):  # the bits of the same call on one thread
                assert torch.equal(a, b)
        seen = len(calls)
        with torch.no_grad():
            moe(torch.randn(most + 1, 512))  # more tokens: the modules
            wide(torch.randn(100, 2048))  # 25 pairs per expert at H=2048: the BLAS's experts, the modules
            torch.set_num_threads(1)
            moe(torch.randn(100, 512))  # one thread: the modules beyond LAYER_MAX_TOKENS
        assert len(calls) == seen
    finally:
        torch.set_num_threads(threads)


def test_calls_from_several_python_threads_at_once():
    """Each Python thread's call gets its own OpenMP team (and its own scratch): the same bits."""
    moe = MoE(preset("bench")).eval()
    xs = [torch.randn(t, 512, generator=torch.Generator().manual_seed(t)) for t in (1, 16, 64, 200)]
    threads, errors = torch.get_num_threads(), []
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            expected = [moe(x) for x in xs]

        def work() -> None:
            for _ in range(5):
                for x, ref in zip(xs, expected):
                    with torch.no_grad():
                        if not torch.equal(moe(x), ref):
                            errors.append(x.shape[0])

        workers = [threading.Thread(target=work) for _ in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(threads)
    assert errors == [], f"different results at T={sorted(set(errors))}"


@needs_openmp
def test_two_threads_hand_a_tie_in_either_half_back_to_torch(calls):
    moe = MoE(preset("bench")).eval()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for tied in (3, 29):  # a token of the first thread's range, then of the second's
            x = torch.randn(32, 512, generator=torch.Generator().manual_seed(tied))
            x[tied] = 0.0  # every score 0.5: a tie torch's topk decides
            with torch.no_grad():
                out, routing = moe(x, return_routing=True)
                ref, ref_routing = _modules_path(moe, x)
            assert torch.equal(routing.topk_indices, ref_routing.topk_indices)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    assert calls == [False, False]  # the C call ran and gave the tokens back to torch


def test_ties_are_left_to_torch(calls):
    moe, _ = _layers(CONFIGS["plain"])
    x = torch.zeros(3, 64)  # every logit 0: every score 0.5, and the bias alone cannot break all ties
    moe.gate.e_score_correction_bias.zero_()
    with torch.no_grad():
        out, routing = moe(x, return_routing=True)
        ref, ref_routing = _modules_path(moe, x)
    assert calls == [False], "a tie must hand the routing back to torch"
    assert torch.equal(out, ref) and torch.equal(routing.topk_indices, ref_routing.topk_indices)


def test_group_ties_and_nan_are_left_to_torch():
    cfg = CONFIGS["grouped"]
    moe, _ = _layers(cfg)
    gate = moe.gate
    args = (moe.experts.gate_up_proj, moe.experts.down_proj, None, 4, 4, 2, True, 2.5)
    x = torch.randn(2, 40)
    assert cpu_kernel.layer_forward(x, gate.weight, gate.e_score_correction_bias, *args) is not None
    # groups 1 and 2 copy group 0 (rows permuted): three equal group scores for two places
    w, b = gate.weight.detach().clone(), gate.e_score_correction_bias.clone()
    for g, perm in ((1, [3, 2, 1, 0]), (2, [1, 0, 3, 2])):
        w[4 * g : 4 * g + 4], b[4 * g : 4 * g + 4] = w[0:4][perm], b[0:4][perm]
    b[12:] = -10.0  # group 3 loses
    assert cpu_kernel.layer_forward(x, w, b, *args) is None
    x_nan = x.clone()
    x_nan[1, 3] = float("nan")
    assert cpu_kernel.layer_forward(x_nan, gate.weight, gate.e_score_correction_bias, *args) is None
    with torch.no_grad():
        out = moe(x_nan)  # torch routes it: NaN in, NaN out for that token, the other token fine
    assert out[1].isnan().all() and not out[0].isnan().any()


def test_router_in_c_equals_torch_on_many_tokens():
    """Many random tokens with a strong bias: the C router picks what torch's topk picks."""
    for name in ("plain", "grouped"):
        moe, _ = _layers(CONFIGS[name], seed=3)
        with torch.no_grad():
            moe.gate.e_score_correction_bias.normal_(std=0.5)
            x = torch.randn(2000, moe.config.hidden_size)
            _, routing = moe(x[:8], return_routing=True)  # through the kernel
            c = moe.config
            done = cpu_kernel.layer_forward(
                x, moe.gate.weight, moe.gate.e_score_correction_bias, moe.experts.gate_up_proj,
                moe.experts.down_proj, None, c.num_experts_per_tok, c.n_group, c.topk_group,
                c.norm_topk_prob, c.routed_scaling_factor,
            )  # fmt: skip
            ref = moe.gate(x)
        assert done is not None
        assert torch.equal(done[4], ref.topk_indices), name
        torch.testing.assert_close(done[3], ref.topk_weights, rtol=1e-6, atol=1e-7)
        assert torch.equal(routing.topk_indices, ref.topk_indices[:8])


@pytest.mark.parametrize("experts, hidden", [(16, 64), (15, 41), (13, 40)])
def test_router_logits_of_every_pass_size_are_the_same_bits(experts, hidden):
    """The C router's logits in passes of 1 to 9 tokens (four rows at a time for up to two, one row or
    two for more) are, for each token, bitwise what it gets alone: its routing cannot depend on the
    batch. Odd expert counts and widths take the leftover rows and columns."""
    cfg = preset(
        "tiny", hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=2, n_shared_experts=0
    )
    moe, _ = _layers(cfg, seed=4)
    c = moe.config
    x = torch.randn(9, hidden)

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        done = cpu_kernel.layer_forward(
            tokens, moe.gate.weight, moe.gate.e_score_correction_bias, moe.experts.gate_up_proj,
            moe.experts.down_proj, None, c.num_experts_per_tok, 1, 1, c.norm_topk_prob, c.routed_scaling_factor,
        )  # fmt: skip
        assert done is not None  # (no ties in random data)
        return done[1]

    alone = torch.cat([logits(x[t : t + 1]) for t in range(9)])
    torch.testing.assert_close(alone, x @ moe.gate.weight.detach().T, rtol=1e-5, atol=1e-5)
    for n in range(2, 10):
        together = logits(x[:n])
        for t in range(n):
            assert torch.equal(together[t], alone[t]), f"token {t} of a pass of {n}"


def test_only_where_it_applies(calls):
    moe, _ = _layers(CONFIGS["plain"])
    x = torch.randn(4, 64)
    out = moe(x)  # gradients on: the training call (see the tests below), not the inference one
    assert calls == [] and out.grad_fn is not None
    with torch.no_grad():
        seen = []
        handle = moe.gate.register_forward_hook(lambda mod, inp, res: seen.append(res.topk_indices))
        moe(x)
        handle.remove()
        assert calls == [] and len(seen) == 1, "a hook on the router must see the router run"
        moe.config = moe.config.replace(dispatch="sorted")  # a strategy asked for by name
        moe(x)
        assert calls == []
        moe.config = moe.config.replace(dispatch="auto")
        moe(torch.randn(4096, 64))  # past the kernel's share of "auto": the torch strategies
        assert calls == []
        moe(x)
        assert calls == [True]
        soft = MoE(CONFIGS["plain"].replace(scoring_func="softmax")).eval()
        soft(x)
        assert calls == [True], "softmax scoring is routed by torch"
        moe.to(torch.bfloat16)(x.bfloat16())
        assert calls == [True], "bfloat16 runs the torch strategies"


def test_steps_aside_for_weights_it_cannot_read_as_they_are(calls):
    """The one C call reads raw memory: a weight that is not one contiguous float32 block (here
    the same values, transposed in memory) sends the call to the modules, with the same result."""
    moe, _ = _layers(CONFIGS["plain"])
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = moe(x)
        assert calls == [True]
        gate_up = moe.experts.gate_up_proj
        gate_up.data = gate_up.data.transpose(1, 2).contiguous().transpose(1, 2)  # same shape and values
        assert not gate_up.is_contiguous()
        out = moe(x)
    assert calls == [True], "a non-contiguous weight must not reach the C call"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_hook_on_a_shared_projection_sees_it_run(calls):
    moe, _ = _layers(CONFIGS["plain"])
    seen = []
    moe.shared_experts.up_proj.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        moe(torch.randn(1, 64))
    assert calls == [] and seen == [torch.Size([1, moe.shared_experts.up_proj.out_features])]


@pytest.mark.parametrize("name", ["gate_proj", "up_proj", "down_proj"])
def test_a_shared_projection_with_a_bias_is_computed_by_its_module(name, calls):
    """The kernel has no bias: a projection swapped for an nn.Linear with one hands the layer (and the
    shared expert on its own) back to the modules, whose answer includes the bias."""
    moe, _ = _layers(CONFIGS["plain"])
    shared = moe.shared_experts
    old = getattr(shared, name)
    biased = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(old.weight)
        biased.bias.fill_(0.5)
    setattr(shared, name, biased)
    x = torch.randn(2, 64)
    with torch.no_grad():
        out = moe(x)
        routing = moe.gate(x)
        mlp = shared.down_proj(shared.act_fn(shared.gate_proj(x)) * shared.up_proj(x))
        ref = moe.experts(x, routing.topk_indices, routing.topk_weights) + mlp
        alone = shared(x[:1])
    assert calls == []
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(alone, mlp[:1])


def test_switched_off_at_run_time(calls, monkeypatch):
    moe, _ = _layers(CONFIGS["plain"])
    x = torch.randn(1, 64)
    with torch.no_grad():
        ref = moe(x)
        monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
        out = moe(x)
    assert calls == [True]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_no_tokens(calls):
    moe, _ = _layers(CONFIGS["plain"])
    with torch.no_grad():
        out, routing = moe(torch.randn(0, 64), return_routing=True)
        out3 = moe(torch.randn(2, 0, 64))
    assert out.shape == (0, 64) and routing.topk_indices.shape == (0, 4) and out3.shape == (2, 0, 64)


# ---- with gradients: the forward and the backward each one C call ---------------------------------


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("tokens", [1, 3, 8, cpu_kernel.TRAIN_MAX_TOKENS])
@pytest.mark.parametrize("name", CONFIGS)
def test_training_matches_the_modules_and_transformers(name, tokens, train_calls, one_thread):
    """Output, input gradient and every parameter's gradient: against the layer's own modules
    (torch router and shared expert under autograd) and transformers' Glm4MoeMoE."""
    moe, hf = _layers(CONFIGS[name])
    ref = MoE(moe.config)  # the same weights, run by its modules (return_routing keeps them)
    ref.load_state_dict(moe.state_dict())
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, moe.config.hidden_size, generator=gen)
    g = torch.randn(tokens, moe.config.hidden_size, generator=gen)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    out = moe(xs[0])
    assert train_calls == [True], "the fused training call did not run"
    out_ref, _ = ref(xs[1], return_routing=True)
    out_hf = hf(xs[2].unsqueeze(0)).squeeze(0)
    assert train_calls == [True]
    for y in (out, out_ref, out_hf):
        y.backward(g)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[2].grad, rtol=1e-4, atol=1e-5)
    ours, theirs, hf_grads = _grads(moe), _grads(ref), _grads(hf)
    assert set(ours) == set(theirs) == {n for n, _ in moe.named_parameters()}
    c = moe.config
    if c.num_experts_per_tok == 1 and c.norm_topk_prob:  # w = s / s = 1: the router's gradient is 0
        assert ours.pop("gate.weight").abs().max() < 1e-6 * ours["experts.down_proj"].abs().max()  # rounding
    else:
        assert ours["gate.weight"].abs().sum() > 0, "the router must get a gradient"
    for n in ours:
        scale = theirs[n].abs().max().clamp_min(1e-6)  # relative to the gradient's size
        torch.testing.assert_close(ours[n] / scale, theirs[n] / scale, rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(ours[n] / scale, hf_grads[n] / scale, rtol=1e-4, atol=1e-5, msg=n)
    untouched = torch.ones(c.n_routed_experts, dtype=torch.bool)
    with torch.no_grad():
        chosen = moe.gate(x).topk_indices.unique()
    untouched[chosen] = False
    assert torch.equal(
        moe.experts.down_proj.grad[untouched], torch.zeros_like(moe.experts.down_proj[untouched])
    )
    assert torch.equal(moe.gate.weight.grad[untouched], torch.zeros_like(moe.gate.weight[untouched]))


@needs_openmp
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' 0-wide shared MLP
@pytest.mark.parametrize("name", CONFIGS)
def test_training_on_two_threads_gives_the_bits_of_one(name, train_calls):
    moe, _ = _layers(CONFIGS[name])
    top_k, threads, most = (
        moe.config.num_experts_per_tok,
        torch.get_num_threads(),
        cpu_kernel.TRAIN_MAX_TOKENS,
    )
    first = -(-2 * cpu_kernel.MIN_PAIRS_PER_OPENMP_THREAD // top_k)  # the fewest tokens for two threads
    counts = sorted(t for t in {first, first + 5, most} if first <= t <= most)
    try:
        for tokens in counts:
            gen = torch.Generator().manual_seed(tokens)
            x = torch.randn(tokens, moe.config.hidden_size, generator=gen)
            g = torch.randn(tokens, moe.config.hidden_size, generator=gen)
            runs = []
            for n in (1, 2):
                torch.set_num_threads(n)
                assert cpu_kernel.layer_train_threads(tokens, top_k) == n or n == 1
                moe.zero_grad(set_to_none=True)
                xg = x.clone().requires_grad_(True)
                out = moe(xg)
                out.backward(g)
                runs.append([out, xg.grad, *(p.grad for p in moe.parameters())])
            for a, b in zip(*runs):
                assert torch.equal(a, b), f"T={tokens}: two threads changed a result or a gradient"
    finally:
        torch.set_num_threads(threads)
    assert train_calls == [True] * 2 * len(counts)


@needs_openmp
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' 0-wide shared MLP
@pytest.mark.parametrize("owner", [0, 1])
@pytest.mark.parametrize("name", ["plain", "grouped", "unnormalised-no-shared"])
def test_experts_a_slow_thread_leaves_are_taken_over_with_the_same_bits(
    name, owner, calls, train_calls, idle_thread
):
    """The one call on two threads, one of which takes none of its own experts: the other thread (and
    its own steals) run them, and the output, the routing and every gradient keep the bits of one thread."""
    moe, _ = _layers(CONFIGS[name])
    threads, tokens = torch.get_num_threads(), 24  # more than RB: both threads route, both own experts
    gen = torch.Generator().manual_seed(owner)
    x, g = (
        torch.randn(tokens, moe.config.hidden_size, generator=gen),
        torch.randn(tokens, moe.config.hidden_size, generator=gen),
    )

    def run():
        with torch.no_grad():
            out, routing = moe(x, return_routing=True)
            plain = moe(x)
        moe.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        trained = moe(xg)
        trained.backward(g)
        return [out, *routing, plain, trained, xg.grad, *(p.grad for p in moe.parameters())]

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        assert cpu_kernel.layer_threads(tokens, moe.config.num_experts_per_tok) == 2
        with idle_thread(owner) as taken_over:
            two = run()
            moved = taken_over()
    finally:
        torch.set_num_threads(threads)
    assert moved > 0, "no expert was taken over from the idle thread"
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b), "experts taken over by another thread changed a result or a gradient"
    assert calls == [True] * 4 and train_calls == [True] * 2


@needs_openmp
def test_training_more_tokens_on_several_threads(train_calls):
    torch.manual_seed(0)
    moe = MoE(preset("bench"))
    ref = MoE(moe.config)  # the same weights, run by its modules (return_routing keeps them)
    ref.load_state_dict(moe.state_dict())
    wide = MoE(
        MoEConfig(hidden_size=2048, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4)
    )
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(100, 512, generator=gen), torch.randn(100, 512, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        out = moe(xs[0])
        out_ref, _ = ref(xs[1], return_routing=True)
        assert train_calls == [True], "the fused training call did not run on two threads"
        out.backward(g)
        out_ref.backward(g)
        wide(torch.randn(100, 2048, requires_grad=True))  # 25 pairs per expert at H=2048: the modules
        assert train_calls == [True]
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    ours, theirs = _grads(moe), _grads(ref)
    assert set(ours) == set(theirs) == {n for n, _ in moe.named_parameters()}
    for n in ours:
        scale = theirs[n].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(ours[n] / scale, theirs[n] / scale, rtol=1e-4, atol=1e-5, msg=n)


def test_training_bench_layer_leading_dimensions_and_accumulation(train_calls, one_thread):
    """[2, 3, H] input, a non-leaf input, two backward passes adding into .grad, frozen weights."""
    moe = MoE(preset("bench"))
    ref = MoE(moe.config)
    ref.load_state_dict(moe.state_dict())
    x = torch.randn(2, 3, 512)
    for layer, routing in ((moe, False), (ref, True)):
        for step in range(2):
            xin = (x * (step + 1)).requires_grad_(True)
            out = layer(xin * 1.0, return_routing=routing)  # a non-leaf input
            out = out[0] if routing else out
            assert out.shape == x.shape
            out.pow(2).sum().backward()
    assert train_calls == [True, True]
    for n, p in moe.named_parameters():
        q = dict(ref.named_parameters())[n]
        scale = q.grad.abs().max()
        torch.testing.assert_close(p.grad / scale, q.grad / scale, rtol=1e-4, atol=1e-5, msg=n)
    # frozen experts and router: only the shared expert and the input get gradients
    moe.zero_grad(set_to_none=True)
    moe.gate.weight.requires_grad_(False)
    moe.experts.requires_grad_(False)
    xin = x.clone().requires_grad_(True)
    moe(xin).sum().backward()
    assert train_calls == [True, True, True]
    assert moe.gate.weight.grad is None and moe.experts.gate_up_proj.grad is None
    assert moe.shared_experts.down_proj.weight.grad is not None and xin.grad is not None


def test_training_stands_aside(train_calls, calls, one_thread):
    """return_routing (a loss may use its logits and scores), more tokens, ties: the modules run,
    with the same gradients; nothing requiring a gradient: the inference call."""
    moe, _ = _layers(CONFIGS["plain"])
    x = torch.randn(4, 64, requires_grad=True)
    out, routing = moe(x, return_routing=True)
    assert train_calls == [] and routing.logits.grad_fn is not None
    moe(torch.randn(cpu_kernel.TRAIN_MAX_TOKENS + 1, 64, requires_grad=True))
    assert train_calls == []
    moe.gate.e_score_correction_bias.zero_()
    tie = torch.zeros(3, 64, requires_grad=True)  # every score 0.5: a tie, which torch decides
    out = moe(tie)
    assert train_calls == [False] and out.grad_fn is not None
    out.sum().backward()
    assert tie.grad is not None and tie.grad.isfinite().all()
    moe.requires_grad_(False)
    moe(torch.randn(2, 64))  # gradients on, but nothing needs one
    assert train_calls == [False] and calls == [True]


def test_training_no_tokens(train_calls, one_thread):
    moe, _ = _layers(CONFIGS["plain"])
    for _ in range(3):  # gradients of real tokens first: their freed buffers hold nonzero values to reuse
        moe(torch.randn(5, 64, requires_grad=True)).sum().backward()
        moe.zero_grad(set_to_none=True)
        x = torch.randn(0, 64, requires_grad=True)
        out = moe(x)
        out.sum().backward()
        assert out.shape == (0, 64) and x.grad.shape == (0, 64)
        for name, p in moe.named_parameters():  # every one (the shared expert's once came back uninitialised)
            assert torch.equal(p.grad, torch.zeros_like(p)), name
        moe.zero_grad(set_to_none=True)
    assert train_calls[-1] is True  # (the C backward ran)


def test_training_call_gives_first_derivatives_and_sorted_the_second(one_thread):
    """The C backward is not itself differentiable (as the experts' kernel): a second derivative
    raises a clear error there, and a torch strategy gives it."""
    moe, _ = _layers(CONFIGS["plain"])
    x = torch.randn(4, 64, requires_grad=True)
    (g,) = torch.autograd.grad(moe(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
    by_torch = MoE(moe.config.replace(dispatch="sorted"))
    by_torch.load_state_dict(moe.state_dict())
    (g,) = torch.autograd.grad(by_torch(x).square().sum(), x, create_graph=True)
    g.sum().backward()
    assert x.grad is not None and x.grad.isfinite().all() and x.grad.abs().sum() > 0
