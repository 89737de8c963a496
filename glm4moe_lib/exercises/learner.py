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


def make_learner_notebook(src: Path, dst: Path) -> int:
    """Write the learner version of ``src`` to ``dst``; return how many solutions were stubbed."""
    nb = nbformat.read(src, as_version=4)
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
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)
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
    for path in paths:
        n = make_learner_notebook(path, args.out / path.name)
        print(f"{path} -> {args.out / path.name} ({n} exercise(s) stubbed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
