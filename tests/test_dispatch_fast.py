"""The fast dispatch paths equal the dense reference; "auto" picks them by shape and device."""

from __future__ import annotations

import json

import pytest
import torch

from glm4moe_lib import MoE, MoEConfig, bench, dispatch
from glm4moe_lib.config import DISPATCH_STRATEGIES, PRESETS
from glm4moe_lib.dispatch import STRATEGIES, choose_strategy, dense_reference, dispatch_combine

H, INTER = 32, 16  # widths multiples of 8 (grouped_mm's alignment on CUDA)


def _routing(tokens: int, experts: int, top_k: int, skew: bool, gen: torch.Generator) -> torch.Tensor:
    """[T, K] distinct experts per token; skewed: a few experts take most of the picks."""
    if skew:
        p = torch.tensor([0.5**e for e in range(experts)]) + 1e-3
    else:
        p = torch.ones(experts)
    if tokens == 0:
        return torch.zeros(0, top_k, dtype=torch.long)
    return torch.multinomial(p.expand(tokens, experts), top_k, generator=gen)


def _problem(tokens, experts, top_k, skew, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen)
    gu = torch.randn(experts, 2 * INTER, H, generator=gen) * H**-0.5
    dn = torch.randn(experts, H, INTER, generator=gen) * INTER**-0.5
    idx = _routing(tokens, experts, top_k, skew, gen)
    w = torch.rand(tokens, top_k, generator=gen)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (x, gu, dn)]
    return (*leaves, idx.to(device), w.to(device).requires_grad_(True))


CASES = [  # tokens, experts, top_k, skewed
    (0, 8, 2, False),  # empty batch
    (1, 16, 4, False),  # one token: most experts get nothing
    (5, 8, 2, False),
    (40, 16, 4, False),
    (40, 16, 4, True),  # skewed: heavy experts run outside the padded slab
    (200, 8, 2, True),
]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}{'-skew' if c[3] else ''}")
def test_strategy_matches_dense_reference_fp32(device, strategy, case):
    if strategy not in dispatch.strategies_for(device):
        pytest.skip(f"{strategy} does not run on {device} here ({dispatch.cpu_kernel.kernel_status()})")
    tokens, experts, top_k, skew = case
    x, gu, dn, idx, w = _problem(tokens, experts, top_k, skew, device, torch.float32)
    ref = dense_reference(x, idx, w, gu, dn)
    out = dispatch_combine(x, idx, w, gu, dn, strategy=strategy)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if tokens == 0:
        return
    g_out = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (x, gu, dn, w), g_out)
    g = torch.autograd.grad(out, (x, gu, dn, w), g_out)
    for name, a, b in zip(("x", "gate_up", "down", "weights"), g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")


@pytest.mark.parametrize("strategy", ["gather_bmm", "sorted_gather", "padded", "grouped_mm", "sorted"])
def test_strategy_bf16_close_to_fp32_reference(device, strategy):
    x, gu, dn, idx, w = _problem(64, 16, 4, True, device, torch.bfloat16, seed=1)
    ref = dense_reference(x.float(), idx, w, gu.float(), dn.float())
    out = dispatch_combine(x, idx, w, gu, dn, strategy=strategy)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    out.float().square().sum().backward()
    assert gu.grad is not None and torch.isfinite(gu.grad.float()).all()


def test_experts_with_zero_tokens_get_zero_gradient():
    x, gu, dn, idx, w = _problem(3, 16, 2, False, "cpu", torch.float32)
    unused = sorted(set(range(16)) - set(idx.flatten().tolist()))
    for strategy in ("gather_bmm", "padded", "grouped_mm"):
        gu.grad = dn.grad = None
        dispatch_combine(x, idx, w, gu, dn, strategy=strategy).sum().backward()
        assert gu.grad[unused].abs().max() == 0 and dn.grad[unused].abs().max() == 0


def test_every_strategy_is_allowed_in_config():
    for name in STRATEGIES:
        assert name in DISPATCH_STRATEGIES
    for name in DISPATCH_STRATEGIES:
        assert name == "auto" or name in STRATEGIES
        MoEConfig(dispatch=name)


def test_moe_layer_same_output_with_every_strategy():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2))
    x = torch.randn(2, 7, 32)
    ref = moe(x)
    for name in dispatch.strategies_for("cpu"):
        moe.config.dispatch = name
        torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-5)


# ---- choose_strategy ----------------------------------------------------------------------------
def test_choose_strategy_cpu_by_shape(monkeypatch):
    e, k = 128, 8
    idx = lambda t: torch.zeros(t, k, dtype=torch.long)  # noqa: E731
    x = lambda t: torch.zeros(t, 512)  # noqa: E731
    # the torch strategies: with the fused C kernel out of the picture (tests/test_cpu_kernel.py)
    monkeypatch.setenv(dispatch.cpu_kernel.ENV_SWITCH, "0")
    cpu_kernel = "grouped_mm" if dispatch.grouped_mm_available("cpu") else "padded"
    for t in (1, 2, 3, 16, 64, 1024, 4096):  # with gradients
        assert choose_strategy(x(t), idx(t), e) == cpu_kernel
        assert choose_strategy(x(t).bfloat16(), idx(t), e) == cpu_kernel
    with torch.no_grad():  # inference
        assert choose_strategy(x(1), idx(1), e) == "gather_bmm"
        assert choose_strategy(x(2), idx(2), e) == "gather_bmm"  # T*K = E/8
        assert choose_strategy(x(16), idx(16), e) == cpu_kernel.replace("padded", "sorted")
        assert choose_strategy(x(1024), idx(1024), e) == cpu_kernel.replace("padded", "sorted")
        assert choose_strategy(x(2048), idx(2048), e) == "loop"  # >= 128 rows per expert
    monkeypatch.setattr(dispatch, "grouped_mm_available", lambda device=None: False)
    assert choose_strategy(x(64), idx(64), e) == "padded"  # older torch, training
    with torch.no_grad():
        assert choose_strategy(x(64), idx(64), e) == "sorted"  # older torch, inference


def test_choose_strategy_grouped_mm_where_supported(monkeypatch):
    monkeypatch.setenv(
        dispatch.cpu_kernel.ENV_SWITCH, "0"
    )  # the torch rules (the C kernel: test_cpu_kernel.py)
    x = torch.zeros(64, 512, dtype=torch.bfloat16)
    idx = torch.zeros(64, 8, dtype=torch.long)
    monkeypatch.setattr(dispatch, "grouped_mm_available", lambda device=None: True)
    assert choose_strategy(x.float(), idx, 128) == "grouped_mm"  # CPU: its C++ loop beats Python's
    monkeypatch.undo()
    if torch.cuda.is_available():
        xc, ic = x.cuda(), idx.cuda()
        expect = "grouped_mm" if dispatch.grouped_mm_available(xc.device) else "padded"
        assert choose_strategy(xc, ic, 128) == expect
        assert choose_strategy(xc.float(), ic, 128) == "padded"  # fp32 on CUDA: batched GEMMs
        assert choose_strategy(xc[:1], ic[:1], 128) == "gather_bmm"  # decoding: no sort, no sync


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_cuda_bf16_matches_reference():
    x, gu, dn, idx, w = _problem(300, 16, 4, True, "cuda", torch.bfloat16)
    ref = dense_reference(x.float(), idx, w, gu.float(), dn.float())
    out = dispatch_combine(x, idx, w, gu, dn, strategy="grouped_mm")
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 64])  # gather_bmm (decoding) and grouped_mm
def test_moe_forward_has_no_host_sync_on_cuda(tokens):
    """The auto paths never wait for the GPU: the layer runs under sync debug mode "error" and can
    be captured in a CUDA graph whose replays equal eager calls on new inputs."""
    from glm4moe_lib import MoE, preset

    torch.manual_seed(0)
    moe = MoE(preset("bench")).to("cuda", torch.bfloat16)
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        moe(x)  # warm-up (cuBLAS handles, lazy init)
        torch.cuda.set_sync_debug_mode("error")
        try:
            eager = moe(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph, static_x, static_out = bench.capture_cuda_graph(moe, x)
        for seed in (1, 2):
            torch.manual_seed(seed)
            new_x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
            static_x.copy_(new_x)
            graph.replay()
            torch.testing.assert_close(static_out, moe(new_x))  # bf16 tolerances
    assert eager.shape == x.shape


def test_choose_strategy_under_torch_compile(monkeypatch):
    """Compiled CPU inference: gather_bmm for T·K <= E/8 as eagerly, then sorted_gather up to
    T·K <= 16E (Inductor fuses it); training and larger batches keep the eager choice."""
    e, k = 128, 8
    monkeypatch.setattr(dispatch, "_compiling", lambda: True)
    x = lambda t: torch.zeros(t, 512)  # noqa: E731
    idx = lambda t: torch.zeros(t, k, dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        assert choose_strategy(x(2), idx(2), e) == "gather_bmm"  # T·K = E/8
        assert choose_strategy(x(3), idx(3), e) == "sorted_gather"
        assert choose_strategy(x(256), idx(256), e) == "sorted_gather"  # T·K = 16E
        assert choose_strategy(x(257), idx(257), e) not in ("gather_bmm", "sorted_gather")
    assert choose_strategy(x(16), idx(16), e) not in ("gather_bmm", "sorted_gather")  # training
    monkeypatch.setattr(dispatch, "_compiling", lambda: False)
    with torch.no_grad():  # eagerly sorted_gather would copy T·K experts' weights: never picked
        assert all(choose_strategy(x(t), idx(t), e) != "sorted_gather" for t in (3, 16, 256))


def test_compiled_layer_equals_eager():
    """torch.compile of the layer gives the eager outputs and gradients: a traced gather_bmm for
    small inference batches, untraceable strategies run eagerly inside it (a graph break, not an
    error)."""
    from glm4moe_lib import MoE, MoEConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4))
    compiled = torch.compile(moe, dynamic=False)
    for tokens in (1, 24, 80):  # T·K = 4 (gather_bmm), 96 (sorted_gather), 320 > 16E (grouped_mm, eager)
        x = torch.randn(tokens, 64)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), moe(x), atol=1e-5, rtol=1e-5)
    x = torch.randn(6, 64)
    compiled(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad(set_to_none=True)
    moe(x).square().sum().backward()
    for n, p in moe.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4)


def test_compiled_small_batches_trace_whole():
    """CPU inference at T·K <= 16E compiles to one graph (fullgraph: a graph break is an error):
    the one-C-call check steps aside before anything Dynamo cannot trace (it once broke the
    graph at torch.get_num_threads on every call)."""
    from glm4moe_lib import MoE, MoEConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4))
    compiled = torch.compile(moe, dynamic=False, fullgraph=True)
    for tokens in (1, 24):  # gather_bmm, sorted_gather
        x = torch.randn(tokens, 64)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), moe(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_layer_equals_eager_cuda_bf16():
    """On CUDA in bf16, torch.compile traces gather_bmm (T=1) and grouped_mm (T=64) whole."""
    from glm4moe_lib import MoE, preset

    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = MoE(preset("bench")).to("cuda", torch.bfloat16)
    compiled = torch.compile(moe, dynamic=False)
    for tokens in (1, 64):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), moe(x), atol=2e-2, rtol=2e-2)
    assert dispatch._compiles("grouped_mm", torch.device("cuda"))


# ---- memory: no [T, E, H] tensors ------------------------------------------------------------------
@pytest.mark.parametrize("skew", [False, True])
def test_padded_slab_is_order_tk_rows(skew):
    tokens, experts, top_k = 512, 64, 4
    idx = _routing(tokens, experts, top_k, skew, torch.Generator().manual_seed(0))
    plan, cap, _, _, heavy = dispatch.padded_plan(idx, experts)
    rows = experts * cap
    assert rows <= 2 * dispatch.PAD_CAPACITY_FACTOR * tokens * top_k + experts
    assert rows < tokens * experts / 4  # far from a [T, E] layout
    if skew:
        assert heavy  # the hot experts run outside the slab
    assert int(plan.counts.sum()) == tokens * top_k


@pytest.mark.parametrize("strategy", ["gather_bmm", "sorted_gather", "padded", "grouped_mm", "sorted"])
@pytest.mark.parametrize("skew", [False, True])
def test_no_intermediate_scales_with_t_times_e(monkeypatch, strategy, skew):
    """Record every tensor the strategy makes through torch ops; none may have T*E*H elements."""
    tokens, experts, top_k = 256, 32, 2
    x, gu, dn, idx, w = _problem(tokens, experts, top_k, skew, "cpu", torch.float32)
    x, gu, dn, w = (t.detach() for t in (x, gu, dn, w))
    if strategy in ("gather_bmm", "sorted_gather"):  # only used while T*K is small: check at its own scale
        x, idx, w = x[:8], idx[:8], w[:8]
        tokens = 8
    biggest = 0

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.data_ptr() not in (gu.data_ptr(), dn.data_ptr()):
                    biggest = max(biggest, t.numel())
            return out

    with Spy():
        dispatch_combine(x, idx, w, gu, dn, strategy=strategy)
    activations = tokens * top_k * max(H, 2 * INTER)  # O(T·K·H)
    weights = tokens * top_k * 2 * INTER * H  # gather_bmm copies T·K experts (T·K <= E/2 only)
    limit = weights if strategy in ("gather_bmm", "sorted_gather") else 4 * activations
    assert biggest <= limit
    assert biggest < tokens * experts * H or strategy in ("gather_bmm", "sorted_gather")


# ---- the benchmark ---------------------------------------------------------------------------------
def test_bench_quick_writes_valid_json(tmp_path):
    out = tmp_path / "r.json"
    threads = torch.get_num_threads()
    try:
        _run_bench_main(out)
    finally:
        torch.set_num_threads(threads)
    _check_bench_json(out)


def _run_bench_main(out):
    bench.main(
        [
            "--preset",
            "tiny",
            "--tokens",
            "1",
            "8",
            "--routing",
            "balanced",
            "skewed",
            "--strategies",
            "auto",
            "padded",
            "--repeats",
            "1",
            "--min-sample",
            "0.0001",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )


def test_decode_steps_take_the_copies_and_tokens_in_turn():
    """Decode rows call copy k % copies on token k % tokens: every copy sees every token, and
    between two calls on one copy all the others run (so its weights leave the caches)."""
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x):
            seen.append((self.name, int(x[0, 0])))
            return x

    xs = torch.arange(3.0)[:, None].expand(3, 4)  # token k holds k
    step = bench._decode_steps([Probe("a"), Probe("b")], xs)
    for _ in range(7):
        step()
    assert seen == [("a", 0), ("b", 1), ("a", 2), ("b", 0), ("a", 1), ("b", 2), ("a", 0)]


def test_bench_names_an_unknown_mode():
    with pytest.raises(ValueError, match="modes contains 'cold': use one of"):
        bench.run(tokens=(1,), modes=("cold",), config=PRESETS["tiny"], device="cpu")


def _check_bench_json(out):
    data = json.loads(out.read_text())
    assert {"torch", "device", "dtype", "config", "repeats"} <= set(data["meta"])
    rows = data["results"]
    cpu = data["meta"]["device"] == "cpu"
    # tokens x routings x (forward, fwd+bwd), and on a CPU decode (T=1 only) x routings
    assert len(rows) == 2 * 2 * 2 + (2 if cpu else 0)
    decode = [r for r in rows if r["mode"] == "decode"]
    assert all(r["tokens"] == 1 for r in decode) and len(decode) == (2 if cpu else 0)
    for r in rows:
        assert r["mode"] in bench.MODES and r["routing"] in bench.ROUTINGS
        assert r["auto_strategy"] in STRATEGIES
        assert r["limit_s"] > 0 and r["limit_bound"] in ("flops", "bytes")
        names = set(r["timings"])
        assert {"lib:auto", "lib:padded", "hf:eager", "hf:grouped_mm", "limit:flops", "limit:bytes"} <= names
        for tm in r["timings"].values():
            assert tm["min_s"] > 0 and tm["ratio"] > 0
        # same layer as transformers: fp32 to rounding; bf16 (CUDA) within a few bf16 ulps (eager
        # sums the K expert outputs in bf16, the library in float32)
        if data["meta"]["device"] == "cpu" and r["mode"] == "forward":  # timed, or why not
            assert "lib:auto+compile" in names or "lib:auto+compile" in r["skipped"]
        tol = 1e-4 if data["meta"]["dtype"] == "float32" else 2e-2
        assert all(err < tol for err in r["hf_max_abs_diff"].values()), r["hf_max_abs_diff"]
    assert "| routing |" in out.with_suffix(".md").read_text()
