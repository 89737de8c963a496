"""Expert parallelism: EPMoE on 1, 2 and 4 gloo processes (127.0.0.1) equals the single-process MoE.

One 4-process launch runs every case on sub-groups of 1, 2 and 4 ranks (starting processes is the
slow part); the tests then compare what the ranks returned with references computed here.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from glm4moe_lib import MoE, parallel, preset
from glm4moe_lib.parallel import (
    EPMoE,
    ExpertParallelError,
    a2a_bytes_formula,
    capacity_keep_mask,
    check_world_size,
    comm_bytes_per_token,
    launch,
    launch_outcomes,
    make_inputs,
    run_check,
    send_counts,
    traffic_matrix,
)

CFG = preset("tiny")  # H=32, 8 experts, top-2, one shared expert
WORLDS = (1, 2, 4)
UNEVEN_TOKENS = [7, 0, 13, 4]  # rank 1 of 2 and 4 has no tokens at all
#: name -> (tokens per rank for a world size, skew, capacity_factor)
CASES = {
    "random": (lambda w: [10] * w, 0.0, None),
    "skewed": (lambda w: UNEVEN_TOKENS[:w], 0.8, None),
    "capacity": (lambda w: [16] * w, 0.5, 1.0),
}
SEED = 3
ROOT = Path(__file__).resolve().parents[1]


def _suite() -> dict:
    """On each of 4 ranks: every case on the sub-groups [0], [0, 1] and [0, 1, 2, 3]."""
    rank = dist.get_rank()
    results: dict = {}
    for world in WORLDS:
        group = dist.new_group(list(range(world)))  # every rank must take part in new_group
        if rank < world:
            for name, (tokens, skew, cf) in CASES.items():
                results[world, name] = run_check(
                    CFG, tokens(world), SEED, skew, cf, group=group, return_tensors=True
                )
        elif world == 2:
            try:
                EPMoE(CFG, group)  # rank 2 or 3 is not in the group [0, 1]
            except ValueError as exc:
                results["not_a_member"] = str(exc)
        dist.barrier()
    # a training step's gradient sync: replicated grads summed over the 4 ranks
    moe, xs, gs = make_inputs(CFG, CASES["random"][0](4), SEED)
    ep = EPMoE.from_moe(moe)
    (ep(xs[rank]) * gs[rank]).sum().backward()
    ep.allreduce_replicated_grads()
    results["replicated_grads"] = {n: p.grad for n, p in ep.replicated_parameters()}
    try:
        EPMoE(preset("tiny", n_routed_experts=6))  # 4 ranks cannot share 6 experts
    except ValueError as exc:
        results["world_size_error"] = str(exc)
    return results


pytestmark = pytest.mark.usefixtures("one_thread")


def _launch_suite() -> list:
    return launch(_suite, 4, timeout_s=120, pg_timeout_s=30)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict:
    if hasattr(request.config, "workerinput"):  # pytest-xdist: launch once, share with the other workers
        import fcntl

        shared = tmp_path_factory.getbasetemp().parent  # this session's folder, common to the workers
        with open(shared / "ep_suite.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = shared / "ep_suite.pt"
            if not path.exists():
                torch.save(_launch_suite(), path)
            per_rank = torch.load(path, weights_only=False)
    else:
        per_rank = _launch_suite()
    merged: dict = {}
    for rank, res in enumerate(per_rank):
        for key, value in res.items():
            merged.setdefault(key, {})[rank] = value
    return merged


def naive_keep(idx: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """The drop rule, spelled out: each expert takes ``cap`` pairs, all first choices (tokens in
    order) before any second choice, and so on (GShard's priority, as in lesson 05)."""
    tokens, top_k = idx.shape
    taken = [0] * num_experts
    keep = torch.zeros(tokens, top_k, dtype=torch.bool)
    for k in range(top_k):
        for t in range(tokens):
            e = int(idx[t, k])
            if taken[e] < cap:
                keep[t, k] = True
                taken[e] += 1
    return keep


def reference(name: str, world: int):
    """Single-process outputs, input grads and parameter grads for a case (computed here)."""
    tokens, skew, cf = CASES[name]
    sizes = tokens(world)
    moe, xs, gs = make_inputs(CFG, sizes, SEED, skew)
    x = torch.cat(xs).requires_grad_(True)
    if cf is None:
        out = moe(x)
        keep = None
    else:  # the same layer with the dropped pairs' weights set to zero
        routing = moe.gate(x)
        keep = torch.cat(
            [
                naive_keep(i, CFG.n_routed_experts, math.ceil(cf * len(i) * CFG.num_experts_per_tok / 8))
                for i in routing.topk_indices.split(sizes)
            ]
        )
        out = moe.experts(x, routing.topk_indices, routing.topk_weights * keep) + moe.shared_experts(x)
    (out * torch.cat(gs)).sum().backward()
    grads = {n: p.grad for n, p in moe.named_parameters()}
    return out.detach(), x.grad, grads, keep


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_outputs_and_grads_equal_single_process(runs, world, name):
    ranks = runs[world, name]
    assert sorted(ranks) == list(range(world))
    out, dx, grads, _ = reference(name, world)
    got_out = torch.cat([ranks[r]["out"] for r in range(world)])
    got_dx = torch.cat([ranks[r]["dx"] for r in range(world)])
    torch.testing.assert_close(got_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_dx, dx, atol=1e-5, rtol=1e-5)
    for r in range(world):
        assert set(ranks[r]["grads"]) == set(grads)
        for n, g in grads.items():
            torch.testing.assert_close(ranks[r]["grads"][n], g, atol=1e-5, rtol=1e-5, msg=n)
        # the ranks' own comparison agrees
        assert ranks[r]["close"] and ranks[r]["max_out_err"] < 1e-5 and ranks[r]["max_grad_err"] < 1e-5


def test_allreduce_replicated_grads_sums_over_ranks(runs):
    _, _, grads, _ = reference("random", 4)
    for r in range(4):
        got = runs["replicated_grads"][r]
        assert set(got) == {n for n in grads if not n.startswith("experts.")}
        for n, g in got.items():
            torch.testing.assert_close(g, grads[n], atol=1e-5, rtol=1e-5, msg=n)


def test_skewed_routing_gives_uneven_and_empty_splits(runs):
    for world in (2, 4):
        sent = torch.tensor([runs[world, "skewed"][r]["stats"]["sent"] for r in range(world)])
        assert (sent == 0).any() and sent.max() > 0  # some routes are empty
        assert len(set(sent.flatten().tolist())) > 2  # splits of several different sizes
        assert runs[world, "skewed"][1]["stats"]["tokens"] == 0  # a rank with no tokens takes part
        loads = [sum(runs[world, "skewed"][r]["stats"]["expert_load"]) for r in range(world)]
        assert loads[0] > max(loads[1:])  # the skew piles the work on rank 0


@pytest.mark.parametrize("world", WORLDS)
def test_capacity_drops_follow_the_rule_and_are_reported(runs, world):
    ranks = runs[world, "capacity"]
    *_, keep = reference("capacity", world)
    got_keep = torch.cat([ranks[r]["keep"] for r in range(world)])
    assert torch.equal(got_keep, keep)
    assert (~keep).sum() > 0  # the case really drops something
    idx = torch.cat([ranks[r]["topk_indices"] for r in range(world)])
    for r in range(world):
        st = ranks[r]["stats"]
        assert st["capacity"] == math.ceil(
            1.0 * st["tokens"] * CFG.num_experts_per_tok / CFG.n_routed_experts
        )
        k_r, i_r = ranks[r]["keep"], ranks[r]["topk_indices"]
        assert st["dropped"] == int((~k_r).sum())
        assert st["dropped_per_expert"] == torch.bincount(i_r[~k_r], minlength=8).tolist()
        assert max(torch.bincount(i_r[k_r], minlength=8).tolist()) <= st["capacity"]
    loads = sum((torch.tensor(ranks[r]["stats"]["expert_load"]) for r in range(world)), torch.tensor(0))
    assert int(loads.sum()) == int(keep.sum()) == len(idx) * CFG.num_experts_per_tok - int((~keep).sum())


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_stats_are_consistent(runs, world, name):
    ranks = runs[world, name]
    stats = [ranks[r]["stats"] for r in range(world)]
    matrix = torch.tensor([s["sent"] for s in stats])  # [W, W]
    received = torch.tensor([s["received"] for s in stats])
    assert torch.equal(received, matrix.T)  # what s sent to d is what d received from s
    assert sum(s["tokens_sent"] for s in stats) == sum(s["tokens_received"] for s in stats)
    e_local = CFG.n_routed_experts // world
    kept_idx = [ranks[r]["topk_indices"][ranks[r]["keep"]] for r in range(world)]
    assert torch.equal(matrix, traffic_matrix(kept_idx, CFG.n_routed_experts, world))
    load = torch.bincount(torch.cat(kept_idx), minlength=CFG.n_routed_experts)
    for r, s in enumerate(stats):
        assert s["rank"] == r and s["world_size"] == world and s["first_expert"] == r * e_local
        assert s["bytes_sent"] == s["tokens_sent"] * CFG.hidden_size * 4  # fp32
        assert s["bytes_received"] == s["tokens_received"] * CFG.hidden_size * 4
        assert s["remote_bytes_sent"] == (s["tokens_sent"] - s["sent"][r]) * CFG.hidden_size * 4
        assert s["expert_load"] == load[r * e_local : (r + 1) * e_local].tolist()
        assert s["load"] == s["tokens_received"] == int(matrix[:, r].sum())


def test_world_size_must_divide_experts(runs):
    msg = runs["world_size_error"][0]
    assert "world_size=4" in msg and "n_routed_experts=6" in msg and "[1, 2, 3, 6]" in msg
    assert set(runs["not_a_member"]) == {2, 3} and "not a member" in runs["not_a_member"][2]
    with pytest.raises(ValueError, match=r"world_size=3 .*n_routed_experts=8.*\[1, 2, 4, 8\]"):
        check_world_size(8, 3)
    with pytest.raises(ValueError, match="world_size=0"):
        check_world_size(8, 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity_factor=0"):
        EPMoE(CFG, capacity_factor=0)
    with pytest.raises(ValueError, match="hidden_size=32"):
        EPMoE(CFG)(torch.randn(3, 5))


def test_single_process_without_process_group(device):
    """No process group: the layer runs alone (world size 1) and equals MoE, in-process."""
    torch.manual_seed(0)
    moe = MoE(CFG).to(device)
    ep = EPMoE.from_moe(moe)
    assert ep.world_size == 1 and ep.experts.gate_up_proj.shape[0] == CFG.n_routed_experts
    x = torch.randn(2, 5, CFG.hidden_size, device=device)
    out, stats = ep(x, return_stats=True)
    torch.testing.assert_close(out, moe(x), atol=1e-5, rtol=1e-5)
    assert stats.sent == stats.received == [10 * CFG.num_experts_per_tok]
    out.square().sum().backward()
    moe(x).square().sum().backward()
    for n, g in ep.gather_full_grads().items():
        torch.testing.assert_close(g, dict(moe.named_parameters())[n].grad, atol=1e-5, rtol=1e-5)


def test_counting_helpers():
    idx = torch.tensor([[0, 5], [7, 1], [2, 3]])
    assert send_counts(idx, 8, 2).tolist() == [4, 2]
    assert traffic_matrix([idx, idx[:1]], 8, 2).tolist() == [[4, 2], [1, 1]]
    keep = capacity_keep_mask(idx.repeat(3, 1), 8, 2)
    assert torch.equal(keep, naive_keep(idx.repeat(3, 1), 8, 2)) and (~keep).sum() == 6
    # first choices win over second choices, whatever the token order
    keep = capacity_keep_mask(torch.tensor([[0, 1], [1, 0], [0, 1]]), 8, 2)
    assert keep.tolist() == [[True, True], [True, False], [True, False]]
    assert a2a_bytes_formula(10, 2, 32, 4, 4) == 10 * 2 * 32 * 4 * 3 / 4
    glm = comm_bytes_per_token(preset("glm4.5"), 8)  # bf16: 8 * 5120 * 2 B * 7/8 each way
    assert glm["dispatch"] == 8 * 5120 * 2 * 7 / 8 and glm["experts_per_rank"] == 20


# ---- a dead or silent rank stops the others within a bounded time ---------------------------------


def _kill_one_rank(victim: int, sleep_s: float) -> tuple[float, str]:
    ep = EPMoE(CFG)
    if dist.get_rank() == victim:
        if sleep_s:  # alive but not calling the layer
            time.sleep(sleep_s)
            return 0.0, "slept"
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        ep(torch.randn(6, CFG.hidden_size)).sum().backward()
    except ExpertParallelError as exc:
        return time.monotonic() - start, str(exc)
    return time.monotonic() - start, "no error"


@pytest.mark.parametrize("sleep_s", [0.0, 4.0], ids=["killed", "silent"])
def test_dead_rank_stops_the_others(sleep_s):
    start = time.monotonic()
    outcomes = launch_outcomes(_kill_one_rank, 4, 1, sleep_s, pg_timeout_s=1.5, timeout_s=30)
    assert time.monotonic() - start < 30
    if sleep_s:
        assert outcomes[1].ok and outcomes[1].result == (0.0, "slept")
    else:
        assert outcomes[1].exitcode == -signal.SIGKILL
    for o in (outcomes[0], outcomes[2], outcomes[3]):
        assert o.ok, o.error
        elapsed, msg = o.result
        assert elapsed < 10, msg  # gloo reports a closed peer at once, a silent one after 1.5 s
        assert f"failed on rank {o.rank} of 4" in msg and "peer rank has probably died" in msg


_real_init_distributed = parallel.init_distributed


def _rank_and_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _stuck_in_setup(*args, **kwargs):
    """Stands in for init_distributed on one rank: the process group never comes up there."""
    if os.environ["RANK"] == "1":
        time.sleep(60)
    return _real_init_distributed(*args, **kwargs)


def test_a_stalled_setup_is_retried_then_reported_with_its_stack(monkeypatch):
    """A rank whose process group does not come up is killed after init_timeout_s (each retry
    starts all ranks again) and its error says so, with the Python stack it was stuck in."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the monkeypatch reaches the ranks only through fork")
    monkeypatch.setattr(parallel, "init_distributed", _stuck_in_setup)
    start = time.monotonic()
    outcomes = launch_outcomes(_rank_and_world, 2, timeout_s=30, init_timeout_s=1.0, init_retries=1)
    assert time.monotonic() - start < 10  # two tries of about a second each, not the 60 s sleep
    assert not outcomes[1].ok and outcomes[1].exitcode is None
    assert "the process group was not up: killed" in outcomes[1].error
    assert "_stuck_in_setup" in outcomes[1].error  # where it was stuck, from its stack dump


# ---- the torchrun entry point ------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_demo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    cmd += ["-m", "glm4moe_lib.parallel", "--tokens", "8", "--skew", "0.5", "--timeout", "30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0/2: 8 tokens" in proc.stdout and "rank 1/2: 8 tokens" in proc.stdout
    assert "world size 2:" in proc.stdout and "-> OK" in proc.stdout


# ---- lesson 09's exercise checks ------------------------------------------------------------------


def test_exercise_checks_accept_the_reference_and_name_mistakes():
    from glm4moe_lib.exercises.lesson_09 import check_dispatch_bytes, check_send_matrix

    assert check_send_matrix(traffic_matrix).passed
    assert "transposed" in repr(check_send_matrix(lambda p, e, w: traffic_matrix(p, e, w).T))
    round_robin = check_send_matrix(
        lambda p, e, w: torch.stack([torch.bincount(i.reshape(-1) % w, minlength=w) for i in p])
    )
    assert "round robin" in repr(round_robin)

    def not_done(*args):
        raise NotImplementedError

    assert check_send_matrix(not_done).status == "not done"
    assert check_dispatch_bytes(a2a_bytes_formula).passed
    assert "(W-1)/W" in repr(check_dispatch_bytes(lambda t, k, h, w, b: float(t * k * h * b)))


def test_figures_draw(runs):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from glm4moe_lib.viz import parallel as vp

    ranks = runs[4, "capacity"]
    stats = [ranks[r]["stats"] for r in range(4)]
    figs = [
        vp.plot_token_routes(
            [ranks[r]["topk_indices"] for r in range(4)], 8, 4, [ranks[r]["keep"] for r in range(4)]
        ),
        vp.plot_traffic_matrix(vp.traffic_from_stats(stats)),
        vp.plot_rank_load(stats, title="capacity"),
        vp.plot_comm_volume([2, 4], [1.0, 2.0], [1.5, 2.5]),
        vp.plot_scale(preset("glm4.5"), [2, 8, 160]),
    ]
    assert all(isinstance(f, Figure) for f in figs)
    assert not plt.get_fignums()  # returned closed, shown once by the notebook
    assert torch.equal(vp.traffic_from_stats(stats), torch.tensor([s["sent"] for s in stats]))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(tokens_per_rank=-1), r"tokens_per_rank=-1 is not allowed: it must be an int >= 0"),
        (dict(tokens_per_rank=[1.5]), r"tokens_per_rank=\[1.5\] is not allowed"),
        (dict(tokens_per_rank=True), r"tokens_per_rank=True is not allowed"),
        (dict(tokens_per_rank=[True]), r"tokens_per_rank=\[True\] is not allowed"),
        (dict(skew=math.nan), r"skew=nan is not allowed: it must be a finite number"),
        (dict(skew="a"), r"skew='a' is not allowed"),
        (dict(atol=-1.0), r"atol=-1.0 is not allowed: it must be a finite number >= 0"),
        (dict(rtol=math.inf), r"rtol=inf is not allowed"),
        (dict(seed=-1), r"seed=-1 is not allowed"),
        (dict(seed=1.5), r"seed=1.5 is not allowed"),
    ],
)
def test_run_check_argument_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        run_check("tiny", **kw)


def test_more_argument_checks():
    with pytest.raises(ValueError, match=r"tokens_per_rank=\[-2\] is not allowed"):
        make_inputs(CFG, [-2])
    with pytest.raises(TypeError, match=r"config must be a MoEConfig, got str"):
        make_inputs("tiny", [2])
    with pytest.raises(TypeError, match=r"config must be a MoEConfig or a preset name, got dict"):
        run_check({})
    with pytest.raises(TypeError, match=r"moe of type dict is not allowed: it must be a glm4moe_lib.moe.MoE"):
        EPMoE.from_moe({})
    with pytest.raises(ValueError, match=r"input_splits=\[True\] is not allowed"):
        parallel.all_to_all(torch.zeros(1, 3), [1], [True])
    with pytest.raises(TypeError, match=r"config must be a MoEConfig, got str"):
        comm_bytes_per_token("tiny", 2)
    with pytest.raises(ValueError, match=r"chunks=\[\] is not allowed"):
        parallel.reference_forward(MoE(CFG), [])


def _fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_rank_device_follows_pick_device(monkeypatch):
    """GLM4MOE_DEVICE decides, as everywhere in the course; CUDA becomes one GPU per local rank."""
    _fake_gpus(monkeypatch, 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GLM4MOE_DEVICE", "cpu")
    assert parallel._rank_device() == torch.device("cpu")  # forced: gloo, although GPUs are there
    monkeypatch.delenv("GLM4MOE_DEVICE")
    assert parallel._rank_device() == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # more ranks than GPUs: all on the CPU
    assert parallel._rank_device() == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("GLM4MOE_DEVICE", "cuda:3")  # one rank keeps the GPU asked for
    assert parallel._rank_device() == torch.device("cuda", 3)
    monkeypatch.setenv("GLM4MOE_DEVICE", "gpu")
    with pytest.raises(ValueError, match="GLM4MOE_DEVICE='gpu' is not allowed"):
        parallel._rank_device()
    _fake_gpus(monkeypatch, 0)
    monkeypatch.delenv("GLM4MOE_DEVICE")
    assert parallel._rank_device() == torch.device("cpu")
