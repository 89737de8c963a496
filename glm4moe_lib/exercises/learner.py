"""Write the learner version of the lessons: every solution between markers becomes a stub.

In the committed notebooks each exercise solution sits between two marker lines::

    def my_router(logits, k):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

The learner version replaces those lines (markers included) with
``raise NotImplementedError("Your turn: ...")`` at the same indentation and clears all outputs, so
the notebook still runs top to bottom and its checks answer "not done yet".

    python -m glm4moe_lib.exercises.learner [--out notebooks/learner] [NOTEBOOK ...]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

from ..train import atomic_write

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = 'raise NotImplementedError("Your turn: write this part, then run the check below.")'


def strip_solutions(source: str) -> str:
    """Replace every BEGIN/END SOLUTION block in ``source`` with a stub line."""
    out: list[str] = []
    inside = False
    for lineno, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"line {lineno}: '{BEGIN}' inside another solution block")
            inside = True
            indent = re.match(r"\s*", line).group(0)
            out.append(indent + STUB)
        elif stripped == END:
            if not inside:
                raise ValueError(f"line {lineno}: '{END}' without a '{BEGIN}' before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"a '{BEGIN}' block is never closed with '{END}'")
    return "\n".join(out)


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """The notebook at ``path``; a missing, unreadable or invalid file raises a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"notebook {str(path)!r} {why}: name an existing .ipynb file")
    try:
        return nbformat.read(path, as_version=4)
    except Exception as exc:  # not JSON, not a notebook, not readable
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ValueError(
            f"notebook {str(path)!r} could not be read as a Jupyter notebook ({type(exc).__name__}: {first})"
        ) from None


def learner_notebook(src: Path) -> tuple[nbformat.NotebookNode, int]:
    """The learner version of the notebook at ``src`` (in memory) and how many solutions it stubbed;
    a ValueError names the notebook and the line of a broken marker."""
    nb = read_notebook(src)
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if BEGIN in cell.source:
            count += cell.source.count(BEGIN)
            try:
                cell.source = strip_solutions(cell.source)
            except ValueError as exc:
                raise ValueError(f"{src}: {exc}") from None
        cell.outputs = []
        cell.execution_count = None
    return nb, count


def make_learner_notebook(src: Path, dst: Path) -> int:
    """Write the learner version of ``src`` to ``dst``; return how many solutions were stubbed."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(
            f"dst={str(dst)!r} is not allowed: it is the source notebook {str(src)!r}, whose solutions "
            "would be overwritten by stubs; write the learner version somewhere else"
        )
    nb, count = learner_notebook(src)
    atomic_write(dst, lambda tmp: nbformat.write(nb, str(tmp)))
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--out", type=Path, default=Path("notebooks/learner"), help="output folder")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(Path("notebooks").glob("*.ipynb"))
    if not paths:
        print("no notebooks found: run this from the repository root or name them", file=sys.stderr)
        return 2
    # check everything before writing anything: no output may land on an input notebook
    for folder in (args.out, *args.out.parents):
        if folder.exists() and not folder.is_dir():
            parser.error(f"--out {str(args.out)!r} is not allowed: {str(folder)!r} is a file, not a folder")
    inputs = {p.resolve(): p for p in paths}
    outputs: dict[Path, Path] = {}
    for path in paths:
        dst = args.out / path.name
        if dst.resolve() in inputs:
            parser.error(
                f"--out {str(args.out)!r} is not allowed: it would write {str(dst)!r} over the input notebook "
                f"{str(inputs[dst.resolve()])!r} and lose its solutions; choose another folder "
                "(default notebooks/learner)"
            )
        if dst.is_dir():
            parser.error(f"--out {str(args.out)!r} is not allowed: {str(dst)!r} is a folder, not a file")
        if dst.resolve() in outputs and outputs[dst.resolve()].resolve() != path.resolve():
            parser.error(
                f"{str(outputs[dst.resolve()])!r} and {str(path)!r} would both be written to {str(dst)!r}: "
                "name notebooks with different file names (or run once per folder with its own --out)"
            )
        outputs[dst.resolve()] = path
    # every learner version is built in memory first: a broken marker in the last notebook stops
    # the run before anything is written
    built = []
    for path in dict.fromkeys(paths):  # (a notebook named twice is written once)
        try:
            built.append((path, *learner_notebook(path)))
        except ValueError as exc:
            parser.error(f"{exc} (nothing was written)")
    for path, nb, n in built:
        atomic_write(args.out / path.name, lambda tmp, nb=nb: nbformat.write(nb, str(tmp)))
        print(f"{path} -> {args.out / path.name} ({n} exercise(s) stubbed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
