"""Bad input to the benchmark, the exercise checks and the learner tool: a clear error naming the
parameter and what is allowed, before any work is done; nothing a user made is lost."""

import math
import shutil
from pathlib import Path

import pytest
import torch

from glm4moe_lib import bench
from glm4moe_lib.config import PRESETS, MoEConfig
from glm4moe_lib.exercises import check_layer_flops, learner
from glm4moe_lib.exercises.core import Case, check_function

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "03_router.ipynb"
TINY = PRESETS["tiny"]


# ---- the learner tool: never overwrite an input notebook --------------------------------------------
@pytest.fixture
def lesson(tmp_path):
    src = tmp_path / "lessons" / NOTEBOOK.name
    src.parent.mkdir()
    shutil.copy(NOTEBOOK, src)
    return src


@pytest.mark.parametrize("out", ["same", "dotdot"])
def test_learner_cli_refuses_to_overwrite_the_source_notebook(lesson, out, capsys):
    before = lesson.read_bytes()
    folder = lesson.parent if out == "same" else lesson.parent / "sub" / ".."
    (lesson.parent / "sub").mkdir()
    with pytest.raises(SystemExit) as exc:
        learner.main(["--out", str(folder), str(lesson)])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert lesson.read_bytes() == before


def test_learner_cli_writes_nothing_when_one_of_several_outputs_is_an_input(lesson, tmp_path, capsys):
    other = tmp_path / NOTEBOOK.name.replace("03", "99")
    shutil.copy(NOTEBOOK, other)
    before = other.read_bytes()
    with pytest.raises(SystemExit) as exc:
        learner.main(["--out", str(tmp_path), str(lesson), str(other)])
    assert exc.value.code == 2 and other.read_bytes() == before
    assert not (tmp_path / lesson.name).exists()  # the first output, fine by itself, is not written either


def test_make_learner_notebook_refuses_dst_equal_to_src(lesson):
    before = lesson.read_bytes()
    with pytest.raises(ValueError, match="dst=.*source notebook"):
        learner.make_learner_notebook(lesson, lesson.parent / "." / lesson.name)
    assert lesson.read_bytes() == before


def test_learner_cli_still_writes_elsewhere(lesson, tmp_path):
    before = lesson.read_bytes()
    assert learner.main(["--out", str(tmp_path / "learner"), str(lesson)]) == 0
    assert (tmp_path / "learner" / lesson.name).exists() and lesson.read_bytes() == before


@pytest.mark.parametrize("kind", ["missing", "not json"])
def test_learner_names_a_missing_or_invalid_notebook(tmp_path, kind, capsys):
    path = tmp_path / "x.ipynb"
    if kind == "not json":
        path.write_text("{")
    with pytest.raises(SystemExit) as exc:
        learner.main(["--out", str(tmp_path / "out"), str(path)])
    assert exc.value.code == 2 and str(path) in capsys.readouterr().err
    with pytest.raises(ValueError, match="notebook .*x.ipynb"):
        learner.make_learner_notebook(path, tmp_path / "out" / "x.ipynb")


# ---- the exercise checks: a learner's function gets its own copies ----------------------------------
def test_check_layer_flops_does_not_let_the_learner_change_a_preset():
    hidden = PRESETS["bench"].hidden_size

    def sneaky(c, t):
        c.hidden_size = 8
        return bench.layer_flops(c, t)

    assert not check_layer_flops(sneaky).passed
    assert PRESETS["bench"].hidden_size == hidden


def test_check_function_hands_the_learner_copies_of_configs_layers_and_dicts():
    config, layer, table = MoEConfig(), torch.nn.Linear(2, 2), {"w": torch.ones(2)}
    weight = layer.weight.detach().clone()

    def sneaky(c, lin, d):
        c.hidden_size = 8
        with torch.no_grad():
            lin.weight.zero_()
        d["w"].zero_()
        d["new"] = 1
        return 0

    def reference(c, lin, d):
        return 0

    assert check_function("copies", sneaky, reference, [Case("one", (config, layer, table))]).passed
    assert config.hidden_size == MoEConfig().hidden_size
    assert torch.equal(layer.weight, weight)
    assert table.keys() == {"w"} and torch.equal(table["w"], torch.ones(2))


# ---- bench.run: every argument checked before any timing ---------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"routings": ("balanced", "nope")}, ValueError, "routings contains 'nope'"),
        ({"tokens": (1, -1)}, ValueError, "tokens=-1"),
        ({"tokens": (1.5,)}, TypeError, "tokens=1.5"),
        ({"tokens": 4}, TypeError, "tokens=4"),
        ({"repeats": 0}, ValueError, "repeats=0"),
        ({"device": "tpu"}, ValueError, "device='tpu'"),
        ({"hf_impls": ("nope",)}, ValueError, "hf_impls contains 'nope'"),
        ({"min_sample_s": 0}, ValueError, "min_sample_s=0"),
        ({"min_sample_s": math.nan}, ValueError, "min_sample_s=nan"),
        ({"clock": "gpu"}, ValueError, "clock='gpu'"),
    ],
)
def test_run_checks_its_arguments_before_timing(monkeypatch, kwargs, error, match):
    def no_timing(*args, **kw):
        raise AssertionError("timed before the arguments were checked")

    monkeypatch.setattr(bench, "time_interleaved", no_timing)
    monkeypatch.setattr(bench, "build_layers", no_timing)
    with pytest.raises(error, match=match):
        bench.run(**{"tokens": (0, 1), "config": TINY, "device": "cpu", "verbose": False, **kwargs})


# ---- bench CLI: clean argparse errors ----------------------------------------------------------------
QUICK = ["--quick", "--tokens", "1", "--routing", "balanced", "--modes", "forward", "--hf", "--no-compile"]


@pytest.mark.parametrize(
    "args, name",
    [
        (["--threads", "-1"], "--threads"),
        (["--threads", "0"], "--threads"),
        (["--repeats", "0"], "--repeats"),
        (["--min-sample", "0"], "--min-sample"),
        (["--min-sample", "nan"], "--min-sample"),
        (["--device", "tpu"], "--device"),
        (["--tokens", "-1"], "--tokens"),
        (["--strategies", "nope"], "--strategies"),
        (["--hf", "nope"], "--hf"),
    ],
)
def test_bench_cli_rejects_bad_values(monkeypatch, capsys, args, name):
    monkeypatch.setattr(bench, "run", lambda **kw: pytest.fail("ran with a bad argument"))
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as exc:
        bench.main([*QUICK, "--no-save", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and name in err and "Traceback" not in err
    assert torch.get_num_threads() == threads


def test_bench_cli_checks_the_output_location_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run", lambda **kw: pytest.fail("ran although the results cannot be written"))
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        bench.main([*QUICK, "--repeats", "1", "--out", str(blocker / "r.json")])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


# ---- bench helpers -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: bench.layer_flops(TINY, "3"), TypeError, "tokens='3'"),
        (lambda: bench.layer_flops(TINY, -5), ValueError, "tokens=-5"),
        (lambda: bench.layer_flops({"hidden_size": 8}, 1), TypeError, "config"),
        (lambda: bench.layer_bytes(TINY, -1, 4), ValueError, "touched=-1"),
        (lambda: bench.layer_bytes(TINY, TINY.n_routed_experts + 1, 4), ValueError, "touched="),
        (lambda: bench.layer_bytes(TINY, 1, 0), ValueError, "elem_size=0"),
        (lambda: bench.layer_bytes(TINY, 1, 2.5), TypeError, "elem_size=2.5"),
        (lambda: bench.markdown_table({}), ValueError, "results"),
        (lambda: bench.time_interleaved({}, torch.device("cpu"), 1, 0.001), ValueError, "steps"),
        (
            lambda: bench.time_interleaved({"s": lambda: None}, torch.device("cpu"), 0, 0.001),
            ValueError,
            "repeats=0",
        ),
    ],
)
def test_bench_helpers_name_what_is_wrong(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _weights(experts=8, inter=4, hidden=8):
    return torch.randn(experts, 2 * inter, hidden), torch.randn(experts, hidden, inter)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"top_k": 0}, ValueError, "top_k=0"),
        ({"top_k": 9}, ValueError, "top_k=9"),
        ({"min_sample_s": math.nan}, ValueError, "min_sample_s=nan"),
        ({"min_sample_s": -1.0}, ValueError, "min_sample_s=-1.0"),
        ({"threads": 1.5}, TypeError, "threads=1.5"),
        ({"repeats": 1.5}, TypeError, "repeats=1.5"),
    ],
)
def test_overlap_probe_names_what_is_wrong(kwargs, error, match):
    gate_up, down = _weights()
    with pytest.raises(error, match=match):
        bench.overlap_probe(gate_up, down, **{"top_k": 2, "tokens_per_expert": (1,), **kwargs})
