"""The learner tool: solutions become stubs, and the learner versions of lessons 01–04 run top to bottom."""

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from glm4moe_lib.exercises.learner import BEGIN, END, STUB, main, make_learner_notebook, strip_solutions

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# Every lesson with exercises (a solution between markers) has a learner version to test.
LESSONS = sorted(
    p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb") if "### BEGIN SOLUTION" in p.read_text()
)

SOLVED = f"""def f(x):
    y = x + 1
    {BEGIN}
    z = y * 2
    return z
    {END}

print(f)"""


def test_strip_solutions_stubs_at_the_same_indentation():
    out = strip_solutions(SOLVED)
    assert out.splitlines() == ["def f(x):", "    y = x + 1", "    " + STUB, "", "print(f)"]
    assert "z = y * 2" not in out and BEGIN not in out and END not in out


def test_strip_solutions_handles_several_blocks_and_no_block():
    two = SOLVED + "\n" + SOLVED
    assert strip_solutions(two).count(STUB) == 2
    assert strip_solutions("x = 1\nprint(x)") == "x = 1\nprint(x)"


def test_stubbed_function_raises_not_implemented():
    namespace = {}
    exec(strip_solutions(SOLVED).replace("print(f)", ""), namespace)
    with pytest.raises(NotImplementedError, match="Your turn"):
        namespace["f"](1)


@pytest.mark.parametrize(
    "source, match",
    [
        (f"{BEGIN}\n{BEGIN}\n{END}", "inside another solution block"),
        (f"x = 1\n{END}", "without a"),
        (f"{BEGIN}\nx = 1", "never closed"),
    ],
)
def test_strip_solutions_rejects_broken_markers(source, match):
    with pytest.raises(ValueError, match=match):
        strip_solutions(source)


def test_make_learner_notebook_clears_outputs(tmp_path):
    nb = new_notebook()
    cell = new_code_cell(SOLVED, execution_count=3)
    cell.outputs = [new_output("stream", name="stdout", text="solved!\n")]
    nb.cells = [new_markdown_cell("# title"), cell]
    src, dst = tmp_path / "nb.ipynb", tmp_path / "learner" / "nb.ipynb"
    nbformat.write(nb, src)
    assert make_learner_notebook(src, dst) == 1
    out = nbformat.read(dst, as_version=4)
    assert out.cells[0].source == "# title"
    assert STUB in out.cells[1].source and out.cells[1].outputs == []
    assert out.cells[1].execution_count is None


def _write_nb(path: Path, source: str) -> Path:
    nb = new_notebook()
    nb.cells = [new_code_cell(source)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_cli_writes_nothing_when_a_later_notebook_has_broken_markers(tmp_path, capsys):
    good = _write_nb(tmp_path / "a_good.ipynb", SOLVED)
    broken = _write_nb(tmp_path / "b_broken.ipynb", f"{BEGIN}\nx = 1")  # never closed
    out = tmp_path / "learner"
    with pytest.raises(SystemExit):
        main(["--out", str(out), str(good), str(broken)])
    err = capsys.readouterr().err
    assert "b_broken.ipynb" in err and "never closed" in err and "nothing was written" in err
    assert not out.exists() or list(out.iterdir()) == []  # not even the good notebook's version


def test_cli_refuses_two_notebooks_with_one_output_name(tmp_path, capsys):
    first = _write_nb(tmp_path / "one" / "lesson.ipynb", SOLVED)
    second = _write_nb(tmp_path / "two" / "lesson.ipynb", SOLVED)
    out = tmp_path / "learner"
    with pytest.raises(SystemExit):
        main(["--out", str(out), str(first), str(second)])
    assert "would both be written" in capsys.readouterr().err
    assert not out.exists()


def test_cli_replaces_an_existing_output_whole_and_leaves_no_temporary_files(tmp_path):
    src = _write_nb(tmp_path / "lesson.ipynb", SOLVED)
    out = tmp_path / "learner"
    (out).mkdir()
    (out / "lesson.ipynb").write_text("an old learner version")
    assert main(["--out", str(out), str(src), str(src)]) == 0  # named twice: written once
    assert sorted(p.name for p in out.iterdir()) == ["lesson.ipynb"]
    assert STUB in nbformat.read(out / "lesson.ipynb", as_version=4).cells[0].source


@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_has_solutions_and_checks(lesson):
    nb = nbformat.read(NOTEBOOKS / f"{lesson}.ipynb", as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    solved = [i for i, s in enumerate(code) if BEGIN in s]
    assert len(solved) >= 2, "each lesson has at least two exercises"
    for i in solved:  # the cell after each exercise calls a check
        assert "check_" in code[i + 1]


@pytest.fixture(scope="module")
def learner_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("learner")
    paths = [str(NOTEBOOKS / f"{lesson}.ipynb") for lesson in LESSONS]
    assert main([*paths, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("lesson", LESSONS)
def test_learner_version_runs_top_to_bottom(learner_dir, lesson):
    from kernel_client import KernelManager
    from nbclient import NotebookClient

    path = learner_dir / f"{lesson}.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert not any(BEGIN in c.source for c in nb.cells)
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        kernel_manager_class=KernelManager,  # no lost wake-ups, no port races (see kernel_client.py)
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError if any cell fails
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")))
    joined = "\n".join(texts)
    n_exercises = sum(STUB in c.source for c in nb.cells if c.cell_type == "code")
    assert n_exercises >= 2
    assert joined.count("not done yet") == n_exercises, joined[-2000:]
    assert "✅" not in joined
