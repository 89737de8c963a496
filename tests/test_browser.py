"""The course in a real browser: JupyterLab runs every notebook, the widgets respond, Voilà serves
the playground.

Headless Chromium (Debian's ``chromium`` package) driven by Playwright for Python. One JupyterLab
server (127.0.0.1, a free port, a token, private Jupyter dirs) serves a temporary copy of
``notebooks/``; each notebook is opened, run with Run > Run All Cells, and must end with every cell
finished (no ``[*]``) and none showing an error. Then each widget view's controls (found by their
``description`` labels) are moved one at a time: at least one must change what the view shows (its
figure's bytes; the text of its Label/HTML/Output for a view without a figure), and every playground
control must. Alongside, Voilà serves the playground as ``make demo`` does. Screenshots, a timing
summary and the server logs go to ``artifacts/browser/``. Without Chromium (or Playwright) the tests
skip and say what to install. Run them in one process: ``pytest -m browser tests/test_browser.py``.

Knobs (environment): BROWSER_JOBS (notebooks at a time, default 3), BROWSER_NB_TIMEOUT (seconds
per notebook, default 240), BROWSER_MAX_CONTROLS (controls moved per notebook, default 4; the
playground: all), CHROMIUM (the browser to use), BROWSER_NOTEBOOKS (a folder to test instead).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
NB_DIR = Path(os.environ.get("BROWSER_NOTEBOOKS", REPO / "notebooks"))
NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb"))
ARTIFACTS = REPO / "artifacts" / "browser"
JOBS = int(os.environ.get("BROWSER_JOBS", "3"))
NB_TIMEOUT = float(os.environ.get("BROWSER_NB_TIMEOUT", "240"))
MAX_CONTROLS = int(os.environ.get("BROWSER_MAX_CONTROLS", "4"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
#: The playground's controls (glm4moe_lib.widgets.playground.LABELS), found by their labels.
PLAYGROUND_LABELS = [
    "experts", "top-K", "scoring", "temperature", "input skew", "batch seed", "balancing", "strength", "steps"
]  # fmt: skip
VOILA_MOVES = ["experts", "top-K", "balancing"]
INSTALL_HINT = (
    "Chromium not found: install Debian's browser with `apt-get update && apt-get install -y chromium` "
    "(or set CHROMIUM=/path/to/chromium); Playwright for Python drives it (`pip install playwright`, "
    "no `playwright install` needed)"
)


def find_chromium() -> str | None:
    """$CHROMIUM if set (only it), else Debian's /usr/bin/chromium or one on PATH."""
    env = os.environ.get("CHROMIUM")
    for candidate in [env] if env else ["/usr/bin/chromium", "chromium", "chromium-browser"]:
        if path := shutil.which(candidate):
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Each xdist worker would start its own JupyterLab and run every notebook again.
        pytest.skip("the browser tests run in one process: `pytest -m browser tests/test_browser.py` (no -n)")
    path = find_chromium()
    if path is None:
        pytest.skip(INSTALL_HINT)
    pytest.importorskip("playwright", reason="Playwright for Python is missing: `pip install playwright`")
    return path


@pytest.fixture(scope="session")
def shots() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def loop():
    """One event loop for the async Playwright objects of the whole session."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _run(loop, coro, timeout: float):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="session")
def browser(chromium, loop, tmp_path_factory):
    """Headless Chromium with a fresh profile; closed (and Playwright stopped) at the end."""
    from playwright.async_api import async_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    pw = _run(loop, async_playwright().start(), 60)
    try:
        context = _run(
            loop,
            pw.chromium.launch_persistent_context(
                str(profile),
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1000},
                timeout=60_000,
            ),
            90,
        )
    except BaseException:
        _run(loop, pw.stop(), 30)
        raise
    context.set_default_timeout(30_000)
    context.set_default_navigation_timeout(60_000)
    try:
        yield context
    finally:
        try:
            _run(loop, context.close(), 30)
        finally:
            _run(loop, pw.stop(), 30)


@pytest.fixture(scope="session")
def lab(chromium, tmp_path_factory):
    """JupyterLab on 127.0.0.1 serving a temporary copy of the notebooks; always stopped."""
    from browser.servers import sandbox, start_lab

    root = tmp_path_factory.mktemp("lab")
    nb_dir = sandbox(root, [NB_DIR / n for n in NOTEBOOKS])
    server = start_lab(root, nb_dir)
    try:
        yield server
    finally:
        server.stop()
        if ARTIFACTS.exists():
            shutil.copy2(server.log, ARTIFACTS / "jupyterlab.log")


def _selected(request) -> tuple[list[str], bool]:
    """The notebooks and whether the Voilà test are selected in this session (-k, node ids)."""
    wanted, voila = [], False
    for item in request.session.items:
        module = getattr(item, "module", None)
        if module is None or module.__name__ != __name__:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "notebook" in params and params["notebook"] not in wanted:
            wanted.append(params["notebook"])
        voila = voila or item.name == "test_playground_in_voila"
    return wanted, voila


@pytest.fixture(scope="session")
def runs(request, loop, browser, shots):
    """Everything this session selected, at once: the notebooks in JupyterLab (``BROWSER_JOBS``
    at a time, longest first) and, beside them, the playground in Voilà."""
    from browser.lab import check_voila_app, run_notebooks

    wanted, want_voila = _selected(request)
    # Longest first keeps every worker busy to the end: the times of the last run (a git-ignored
    # artifact) when there are some, else the file size as a guess.
    try:
        last = json.loads((shots / "durations.json").read_text())
    except (OSError, ValueError):
        last = {}
    wanted.sort(key=lambda n: (-last.get(n, 0.0), -(NB_DIR / n).stat().st_size))
    tasks, names = [], []
    if wanted:
        lab = request.getfixturevalue("lab")
        controls = {n: (len(PLAYGROUND_LABELS) if n == "playground.ipynb" else MAX_CONTROLS) for n in wanted}
        tasks.append(run_notebooks(browser, lab.url, lab.token, wanted, shots, NB_TIMEOUT, JOBS, controls))
        names.append("lab")
    if want_voila and "playground.ipynb" in NOTEBOOKS:
        voila = request.getfixturevalue("voila")
        tasks.append(check_voila_app(browser, voila.url + "/", shots, ".glm-playground", VOILA_MOVES, 150))
        names.append("voila")
    budget = NB_TIMEOUT * (len(wanted) / max(JOBS, 1) + 1) + 180

    async def everything():
        return await asyncio.gather(*tasks)

    start = time.monotonic()
    done = dict(zip(names, _run(loop, everything(), budget)))
    seconds = time.monotonic() - start
    if wanted:
        request.getfixturevalue("lab").remember_children()
        _write_summary(shots / "summary.txt", done["lab"], done.get("voila"), seconds)
    return done


def _write_summary(path: Path, results: dict, voila, seconds: float) -> None:
    lines = [f"{len(results)} notebooks in JupyterLab, {JOBS} at a time, and Voilà beside: {seconds:.0f} s"]
    for name in sorted(results):
        r = results[name]
        verdict = "FAIL" if (r.failure or r.errors or r.unfinished) else "ok"
        lines.append(
            f"{verdict:4} {name}: {r.seconds:.0f} s (open {r.open_seconds:.0f} s, cells {r.run_seconds:.0f} s), "
            f"{r.widget_views} widget views {r.failure}"
        )
        lines += [
            f"       {'changed  ' if m.changed else 'NO CHANGE'} {m.view}: {m.label} {m.seconds:.1f} s"
            for m in r.interactions
        ]
        lines += [f"       error: {e.splitlines()[0]}" for e in r.errors]
        lines += [f"       page error: {e}" for e in r.page_errors[:3]]
    if voila is not None:
        lines.append(
            f"{'FAIL' if voila.failure else 'ok':4} Voilà playground: {voila.seconds:.0f} s {voila.failure}"
        )
        lines += [
            f"       {'changed  ' if m.changed else 'NO CHANGE'} {m.label} {m.seconds:.1f} s"
            for m in voila.interactions
        ]
    path.write_text("\n".join(lines) + "\n")
    try:
        durations = json.loads((path.parent / "durations.json").read_text())
    except (OSError, ValueError):
        durations = {}
    durations.update({name: round(r.seconds, 1) for name, r in results.items() if not r.failure})
    (path.parent / "durations.json").write_text(json.dumps(durations, indent=1, sort_keys=True))
    print("\n" + "\n".join(lines))


def _uses_widgets(notebook: str) -> bool:
    """Does the notebook import the course's widgets (so a widget view must appear)?"""
    text = (NB_DIR / notebook).read_text(encoding="utf-8")
    return "glm4moe_lib.widgets" in text or "from glm4moe_lib import widgets" in text


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab(notebook, runs):
    r = runs["lab"][notebook]
    where = f"(screenshots: {', '.join(r.screenshots) or 'none'})"
    assert not r.failure, f"{notebook}: {r.failure} {where}"
    assert not r.errors, f"{notebook}: cells show errors {where}:\n" + "\n\n".join(r.errors)
    assert not r.unfinished, f"{notebook}: {r.unfinished} {where}"
    if _uses_widgets(notebook):
        assert r.widget_views > 0, f"{notebook} uses glm4moe_lib.widgets but no widget view rendered {where}"
    # Every widget view must respond: moving its controls one by one from the defaults, at least
    # one changes its figure (or, for a view without one, the text its Label/HTML/Output shows) (a control may legitimately do nothing at the defaults, e.g. "which
    # expert gets the bias" while the bias is 0; those are listed in the summary).
    views: dict[str, list] = {}
    for i in r.interactions:
        views.setdefault(i.view, []).append(i)
    dead = [v for v, moves in views.items() if not any(m.changed for m in moves)]
    assert not dead, (
        f"{notebook}: nothing it shows (figure, or text) changed for any control of "
        + "; ".join(
            f"{v} (moved {', '.join(m.label for m in views[v])}; see {views[v][-1].screenshot})" for v in dead
        )
    )


@pytest.mark.skipif("playground.ipynb" not in NOTEBOOKS, reason="notebooks/playground.ipynb is missing")
def test_playground_controls_all_redraw(runs):
    """Every playground control, found by its label, redraws the figure (JupyterLab)."""
    r = runs.get("lab", {}).get("playground.ipynb")
    if r is None:
        pytest.skip("playground.ipynb was not selected in this session")
    moved = {i.label.split(" (")[0] for i in r.interactions if i.changed}
    assert set(PLAYGROUND_LABELS) <= moved, f"not redrawn: {set(PLAYGROUND_LABELS) - moved}"


@pytest.fixture(scope="session")
def voila(chromium, tmp_path_factory):
    """Voilà serving the playground as an app (as ``make demo``); always stopped."""
    from browser.servers import sandbox, start_voila

    root = tmp_path_factory.mktemp("voila")
    nb_dir = sandbox(root, [NB_DIR / "playground.ipynb"])
    server = start_voila(root, nb_dir, "playground.ipynb")
    try:
        yield server
    finally:
        server.stop()
        if ARTIFACTS.exists():
            shutil.copy2(server.log, ARTIFACTS / "voila.log")


@pytest.mark.skipif("playground.ipynb" not in NOTEBOOKS, reason="notebooks/playground.ipynb is missing")
def test_playground_in_voila(runs):
    """``make demo``: the Voilà app shows the controls and the figure, no code, and redraws."""
    v = runs["voila"]
    assert not v.failure, f"Voilà: {v.failure} (see artifacts/browser/voila-app-failure.png, voila.log)"
    assert v.labels == PLAYGROUND_LABELS, f"controls shown by Voilà: {v.labels}"
    assert v.figures >= 2, f"{v.figures} images: expected the dashboard's figure and the static one"
    assert v.code_inputs == 0, f"Voilà shows {v.code_inputs} code inputs: the app must have none"
    moved = [m.label.split(" (")[0] for m in v.interactions]
    assert moved == VOILA_MOVES, f"moved {moved}"
    stuck = [m.label for m in v.interactions if not m.changed]
    assert not stuck, f"the figure did not change in Voilà after: {stuck}"
