"""bench.time_interleaved (who gets a warm-up call, how many calls and samples, what it reports)
and what the limit's read step reads.

A fake clock that only moves when a step runs makes every timing exact: each step "costs" a
fixed number of seconds, and the log of calls shows what ran before each timed sample.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glm4moe_lib import bench
from glm4moe_lib.config import PRESETS
from glm4moe_lib.moe import MoE

CPU = torch.device("cpu")


class FakeClock:
    """Time that advances by a step's cost when that step runs; a log of the steps called."""

    def __init__(self) -> None:
        self.t = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.t

    def step(self, name: str, cost: float):
        def run() -> None:
            self.log.append(name)
            self.t += cost

        return run


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setitem(bench.CLOCKS, "wall", fake)
    return fake


def test_fast_steps_of_one_call_per_sample_start_warm_too(clock):
    # "limit" fits 4 calls in a sample, "lib" (a 30 ms backward, say) one: both must follow a call of
    # themselves. Before the fix only steps of several calls per sample got their warm-up.
    steps = {"limit": clock.step("limit", 0.003), "lib": clock.step("lib", 0.030)}
    result = bench.time_interleaved(steps, CPU, repeats=4, min_sample_s=0.01)
    assert result["limit"]["calls_per_sample"] == 4 and result["lib"]["calls_per_sample"] == 1
    assert clock.log[:4] == ["limit", "limit", "lib", "lib"]  # calibration
    # every round, each step: one untimed call, then its timed ones (the first step rotates)
    expected = []
    for order in (["limit", "lib"], ["lib", "limit"]) * 2:
        for name in order:
            expected += [name] * (1 + result[name]["calls_per_sample"])
    assert clock.log[4:] == expected
    assert result["lib"]["min_s"] == pytest.approx(0.030) and result["limit"]["min_s"] == pytest.approx(0.003)


def test_slow_steps_skip_the_warm_up_and_stop_after_a_few_samples(clock):
    slow_cost = bench.SLOW_CALL_S * 2
    steps = {"fast": clock.step("fast", 0.02), "slow": clock.step("slow", slow_cost)}
    result = bench.time_interleaved(steps, CPU, repeats=bench.SLOW_SAMPLES + 3, min_sample_s=0.01)
    # the slow step: two calibration calls (the second is its first sample), then one call per sample
    assert clock.log.count("slow") == 1 + bench.SLOW_SAMPLES
    assert result["slow"]["calls_per_sample"] == 1
    assert result["slow"]["min_s"] == pytest.approx(slow_cost)
    # the fast one: a warm-up and a timed call in every round
    assert clock.log.count("fast") == 2 + 2 * (bench.SLOW_SAMPLES + 3)
    i = 4
    while i < len(clock.log):
        if clock.log[i] == "fast":
            assert clock.log[i + 1] == "fast", clock.log  # the timed call follows its warm-up
            i += 2
        else:
            assert clock.log[i] == "slow"
            i += 1


def test_the_min_and_median_are_per_call_and_the_warm_up_is_not_counted(clock):
    costs = iter(
        [0.004, 0.004]  # calibration: 4 ms a call -> 2 calls per 8 ms sample
        + [0.004, 0.004, 0.004]  # round 1: warm-up, then a sample of 4 ms a call
        + [0.009, 0.002, 0.002]  # round 2: a slow warm-up (not timed), 2 ms a call
        + [0.004, 0.003, 0.003]  # round 3: 3 ms a call
    )

    def step() -> None:
        clock.t += next(costs)

    result = bench.time_interleaved({"s": step}, CPU, repeats=3, min_sample_s=0.008)
    assert result["s"]["calls_per_sample"] == 2
    assert result["s"]["min_s"] == pytest.approx(0.002)
    assert result["s"]["median_s"] == pytest.approx(0.003)
    assert next(costs, None) is None  # every call accounted for: 2 + 3 rounds of 3


def test_a_bad_clock_is_refused():
    with pytest.raises(ValueError, match=r"clock='gpu' is not allowed: use one of \['cpu', 'wall'\]"):
        bench.time_interleaved({"s": lambda: None}, CPU, repeats=1, min_sample_s=0.01, clock="gpu")


# ---- the limit's read: the library layer's own weights ------------------------------------------


class _Reads(TorchDispatchMode):
    """The (data_ptr, numel) of every tensor argument the ops under it read; what copy_ writes."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[tuple[int, int]] = []
        self.written: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten.copy_.default:
            self.written.append((tensors[0].data_ptr(), tensors[0].numel()))
            tensors = tensors[1:]
        self.read += [(t.data_ptr(), t.numel()) for t in tensors]
        return func(*args, **(kwargs or {}))


def _inside(ptr: int, numel: int, t: torch.Tensor) -> bool:
    return t.data_ptr() <= ptr and ptr + 4 * numel <= t.data_ptr() + 4 * t.numel()


def test_layer_weights_are_every_parameter_once_the_experts_first():
    layer = MoE(PRESETS["tiny"])
    weights = bench.layer_weights(layer)
    assert weights[0] is layer.experts.gate_up_proj and weights[1] is layer.experts.down_proj
    assert sorted(map(id, weights)) == sorted(map(id, layer.parameters()))


@pytest.mark.parametrize("touched", [1, 3, PRESETS["tiny"].n_routed_experts])
@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
def test_the_layer_read_reads_the_layers_own_weights(touched, mode):
    config = PRESETS["tiny"]
    layer = MoE(config)
    weights = bench.layer_weights(layer)
    step = bench.layer_read_step(config, touched, mode, weights, "cpu", torch.float32)
    with _Reads() as reads:
        step()
    count = bench.layer_bytes(config, touched, 1)
    assert sum(n for _, n in reads.read) == count  # exactly the touched weights' elements
    # every read lies in the layer's weights, the experts' gate_up_proj first
    assert all(any(_inside(p, n, w) for w in weights) for p, n in reads.read), reads.read
    assert reads.read[0][0] == layer.experts.gate_up_proj.data_ptr()
    if touched == config.n_routed_experts:  # more than the experts hold: the router and shared expert too
        assert len(reads.read) > 2
    else:
        assert len(reads.read) <= 2
    if mode == "forward":
        assert reads.written == []
    else:  # the gradients: fresh memory, as many elements, none of it the weights'
        assert sum(n for _, n in reads.written) == count
        assert not any(any(_inside(p, n, w) for w in weights) for p, n in reads.written)


@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
def test_the_limits_own_read_is_a_fresh_buffer_of_as_many_elements(mode):
    config = PRESETS["tiny"]
    layer = MoE(config)
    _, bytes_step, _, nbytes = bench.limit_steps(config, 4, 3, mode, "cpu", torch.float32)
    with _Reads() as reads:
        bytes_step()
    assert sum(n for _, n in reads.read) == bench.layer_bytes(config, 3, 1)
    assert nbytes == bench.layer_bytes(config, 3, 4, backward=mode != "forward")
    assert not any(any(_inside(p, n, w) for w in layer.parameters()) for p, n in reads.read)
    assert sum(n for _, n in reads.written) == (0 if mode == "forward" else bench.layer_bytes(config, 3, 1))


@pytest.mark.parametrize(
    "weights",
    [
        [],  # none given
        [torch.zeros(10)],  # fewer elements than the touched weights hold
        [torch.zeros(10**6, dtype=torch.float64)],  # another dtype
        [torch.zeros(2000, 1000).t()],  # not contiguous
    ],
    ids=["none", "too-few", "float64", "strided"],
)
def test_no_layer_read_where_the_weights_do_not_fit(weights):
    assert bench.layer_read_step(PRESETS["tiny"], 3, "forward", weights, "cpu", torch.float32) is None


@pytest.mark.parametrize("faster", ["limit:bytes", "limit:bytes_layer"])
def test_the_limit_takes_the_faster_read(monkeypatch, faster):
    """bench.run with made-up times: the bytes limit is the faster of the two reads, whichever it is."""
    seen: list[set[str]] = []

    def fake(steps, device, repeats, min_sample_s, clock="wall"):
        seen.append(set(steps))
        times = {name: 1.0 for name in steps}
        times["limit:flops"] = 0.1
        times["limit:bytes"] = times["limit:bytes_layer"] = 0.5
        times[faster] = 0.25
        return {n: {"min_s": t, "median_s": t, "calls_per_sample": 1} for n, t in times.items()}

    monkeypatch.setattr(bench, "time_interleaved", fake)
    result = bench.run(
        tokens=(1, 4), routings=("balanced",), modes=("forward", "fwd+bwd", "decode"), config=PRESETS["tiny"],
        device="cpu", strategies=("auto",), hf_impls=(), verbose=False, compile_layer=False,
    )  # fmt: skip
    assert len(result["results"]) == 5 and all({"limit:bytes", "limit:bytes_layer"} <= s for s in seen)
    for row in result["results"]:
        assert row["limit_s"] == 0.25 and row["limit_bound"] == "bytes"
        assert row["timings"]["lib:auto"]["ratio"] == pytest.approx(4.0)
