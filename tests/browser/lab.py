"""Drive JupyterLab and Voilà pages with Playwright (async API): run notebooks, move widgets.

Everything here has a bounded wait. Notebook state is read from JupyterLab's own model through
``window.jupyterapp`` (the server runs with ``--LabApp.expose_app_in_browser``) and from the DOM
(``[*]`` prompts, rendered error outputs), so a cell counts as failed whichever way it shows.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from playwright.async_api import BrowserContext, Locator, Page
from playwright.async_api import Error as PlaywrightError

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

#: Widget controls the test can move, as CSS selectors for ipywidgets 8's DOM.
CONTROL_SELECTOR = ".widget-slider, .widget-dropdown, .widget-toggle-buttons, .widget-checkbox, .widget-radio"
#: An output that holds a widget view (outermost only: not the outputs of an Output widget in it).
WIDGET_OUTPUT = ".jp-OutputArea-output:has(.jupyter-widgets):not(.jp-OutputArea-output .jp-OutputArea-output)"

# Status of one notebook panel, from the model and the DOM. Cells with only whitespace are not run
# by JupyterLab and are not counted.
_STATUS_JS = """
(path) => {
  const app = window.jupyterapp;
  if (!app) return null;
  let panel = null;
  for (const w of app.shell.widgets('main')) {
    if (w.context && w.context.path === path && w.content && w.sessionContext) { panel = w; break; }
  }
  if (!panel || !panel.context.isReady) return null;
  const out = {code: 0, done: 0, running: 0, pending: [], errors: [], widgetErrors: [],
               kernel: 'none', kernelName: panel.sessionContext.kernelDisplayName};
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  if (kernel) out.kernel = kernel.status;
  panel.content.widgets.forEach((cell, i) => {
    if (cell.model.type !== 'code') return;
    if (!cell.model.sharedModel.getSource().trim()) return;
    out.code += 1;
    const prompt = cell.node.querySelector('.jp-InputPrompt');
    const ptext = prompt ? prompt.textContent : '';
    if (ptext.includes('*')) out.running += 1;
    else if (cell.model.executionCount !== null) out.done += 1;
    else out.pending.push(i);
    const outputs = cell.model.outputs.toJSON();
    for (const o of outputs) {
      if (o.output_type === 'error') {
        out.errors.push({cell: i, ename: o.ename, evalue: o.evalue, traceback: (o.traceback || []).join('\\n')});
      }
    }
    const rendered = cell.node.querySelector('[data-mime-type="application/vnd.jupyter.error"]');
    if (rendered && !outputs.some((o) => o.output_type === 'error')) {
      out.errors.push({cell: i, ename: 'rendered error', evalue: rendered.textContent.slice(0, 2000), traceback: ''});
    }
    const text = cell.node.querySelector('.jp-Cell-outputWrapper');
    if (text && /Error displaying widget|Failed to render widget/.test(text.textContent)) {
      out.widgetErrors.push({cell: i, text: text.textContent.slice(0, 500)});
    }
  });
  return out;
}
"""

# A fingerprint of every figure under a root element: the bytes of each <img> (data: or blob:
# URL, fetched) and the markup of each inline SVG; for a root without figures, the text its
# Label / HTML / Output widgets show.
_FIGURES_JS = r"""
async (root) => {
  const fnv = (codes) => { let h = 0x811c9dc5; for (const c of codes) { h ^= c; h = Math.imul(h, 0x01000193) >>> 0; } return h.toString(16); };
  const strCodes = function* (s) { for (let i = 0; i < s.length; i++) yield s.charCodeAt(i); };
  const parts = [];
  for (const img of root.querySelectorAll('img')) {
    const src = img.getAttribute('src') || '';
    if (!src) { parts.push('empty'); continue; }
    try {
      const r = await fetch(src);
      const b = new Uint8Array(await r.arrayBuffer());
      parts.push(b.length + ':' + fnv(b));
    } catch (e) {
      parts.push('src:' + fnv(strCodes(src)));
    }
  }
  for (const svg of root.querySelectorAll('svg')) {
    if (svg.closest('.jp-RenderedSVG, [data-mime-type="image/svg+xml"]')) parts.push('svg:' + fnv(strCodes(svg.outerHTML)));
  }
  if (!parts.length) {  // a view without a figure: what it writes (labels, HTML, Output text)
    const texts = [...root.querySelectorAll('.widget-label, .widget-html-content, .widget-htmlmath-content, .widget-output')]
      .filter((e) => !e.closest('CONTROLS'));  // not the controls' own descriptions
    if (texts.length) parts.push('text:' + fnv(strCodes(texts.map((t) => t.textContent).join('\\n'))));
  }
  return parts.join('|');
}
""".replace("CONTROLS", CONTROL_SELECTOR)


@dataclass
class Interaction:
    view: str  # which widget view (notebook and index)
    label: str
    kind: str
    before: str
    after: str
    changed: bool
    seconds: float
    screenshot: str = ""


@dataclass
class NotebookResult:
    name: str
    seconds: float = 0.0
    open_seconds: float = 0.0  # page load until the kernel is idle
    run_seconds: float = 0.0
    status: dict | None = None
    errors: list[str] = field(default_factory=list)  # cells that show an error
    unfinished: str = ""  # why not every cell finished (empty: all did)
    interactions: list[Interaction] = field(default_factory=list)
    widget_views: int = 0
    screenshots: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)  # uncaught JavaScript exceptions
    failure: str = ""  # harness-level failure (timeout, page crash)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "x"


async def _poll(fn, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Call async ``fn`` until it returns a truthy value; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


async def status(page: Page, path: str) -> dict | None:
    return await page.evaluate(_STATUS_JS, path)


async def figures(root: Locator) -> str:
    return await root.evaluate(_FIGURES_JS)


async def open_notebook(page: Page, base: str, token: str, path: str, timeout: float) -> None:
    """Open ``path`` in its own JupyterLab workspace and wait for an idle kernel."""
    workspace = "t-" + _slug(Path(path).stem)
    await page.goto(
        f"{base}/lab/workspaces/{workspace}/tree/{path}?reset&token={token}", timeout=timeout * 1000
    )

    async def ready():
        try:
            s = await status(page, path)
        except PlaywrightError as exc:
            # JupyterLab may still navigate while it resets the workspace (seen once in CI, on a busy
            # machine): the page's script context is then gone for a moment; poll again
            if "Execution context was destroyed" in str(exc):
                return None
            raise
        return s if s and s["kernel"] == "idle" else None

    await _poll(ready, timeout, what=f"{path} to open with an idle kernel")


async def run_all(page: Page, path: str, timeout: float) -> dict:
    """Run All Cells (the command behind Run > Run All Cells) and wait until every cell finished
    (no ``[*]`` left, kernel idle) or a cell raised. Returns the final status."""
    await page.evaluate(
        """(path) => {
        const app = window.jupyterapp;
        for (const w of app.shell.widgets('main')) {
          if (w.context && w.context.path === path) { app.shell.activateById(w.id); break; }
        }
        app.commands.execute('notebook:run-all-cells');
      }""",
        path,
    )
    stable = {"n": 0}

    async def finished():
        s = await status(page, path)
        if s is None:
            return None
        over = s["running"] == 0 and s["kernel"] == "idle" and (s["done"] == s["code"] or s["errors"])
        stable["n"] = stable["n"] + 1 if over else 0
        return s if stable["n"] >= 3 else None  # three polls in a row: no cell left queued

    return await _poll(finished, timeout, interval=0.5, what=f"all cells of {path} to finish")


async def controls_of(view: Locator) -> list[tuple[str, str, Locator]]:
    """(label, kind, locator) of every control in a widget view, labels from ``description``."""
    found = []
    for ctrl in await view.locator(CONTROL_SELECTOR).all():
        if not await ctrl.is_visible():
            continue
        classes = await ctrl.get_attribute("class") or ""
        kind = next(
            k
            for k in ("slider", "dropdown", "toggle-buttons", "checkbox", "radio")
            if f"widget-{k}" in classes
        )
        label = ctrl.locator(".widget-label").first
        text = (await label.inner_text()).strip() if await label.count() else ""
        found.append((text or f"<{kind} without a description>", kind, ctrl))
    return found


async def move(page: Page, kind: str, ctrl: Locator) -> str:
    """Change one control the way a user would; returns what was done."""
    if kind == "dropdown":
        select = ctrl.locator("select")
        options = await select.locator("option").all_inner_texts()
        current = await select.evaluate("(s) => s.selectedIndex")
        target = (current + 1) % len(options)
        await select.select_option(index=target)
        return f"selected {options[target]!r}"
    if kind == "slider":
        handle = ctrl.locator(".noUi-handle").first
        now = float(await handle.get_attribute("aria-valuenow") or 0)
        top = float(await handle.get_attribute("aria-valuemax") or 0)
        key = "ArrowLeft" if now >= top else "ArrowRight"
        await handle.focus()
        await handle.press(key)
        await handle.blur()
        return f"{key} from {now:g}"
    if kind == "toggle-buttons":
        button = ctrl.locator("button:not(.mod-active)").first
        text = await button.inner_text()
        await button.click()
        return f"clicked {text!r}"
    if kind == "checkbox":
        await ctrl.locator("input[type=checkbox]").click()
        return "toggled"
    radios = ctrl.locator("input[type=radio]:not(:checked)")
    await radios.first.check()
    return "picked another option"


async def exercise_view(
    page: Page,
    view: Locator,
    scope: Locator,
    shots: Path,
    prefix: str,
    max_controls: int,
    timeout: float,
    only: list[str] | None = None,
) -> list[Interaction]:
    """Move each control of ``view`` (or those labelled ``only``) and check that the figures
    under ``scope`` change. Screenshots of the view after each move go to ``shots``."""
    done = []
    controls = await controls_of(view)
    if only is not None:
        controls = [c for c in controls if c[0] in only]
    for label, kind, ctrl in controls[:max_controls]:
        start = time.monotonic()
        before = await figures(scope)
        action = await move(page, kind, ctrl)

        async def changed(before=before):
            now = await figures(scope)
            return now if now != before and "empty" not in now else None

        try:
            after = await _poll(changed, timeout, interval=0.25, what=f"the figure to change after {label}")
            await asyncio.sleep(0.3)
            after = await figures(scope)
        except TimeoutError:
            after = await figures(scope)
        shot = shots / f"{prefix}-{_slug(label)}.png"
        try:
            await view.screenshot(path=str(shot), timeout=15_000)
        except Exception:  # a screenshot is an artifact, not the test
            shot = Path("")
        done.append(
            Interaction(
                prefix,
                f"{label} ({action})",
                kind,
                before,
                after,
                after != before,
                time.monotonic() - start,
                str(shot),
            )
        )
    return done


async def run_notebook(
    context: BrowserContext,
    base: str,
    token: str,
    path: str,
    shots: Path,
    timeout: float,
    max_controls: int = 6,
    move_timeout: float = 15.0,
) -> NotebookResult:
    """Open, run all cells, check them, move the widgets; always closes the page and the kernel."""
    result = NotebookResult(path)
    stem = Path(path).stem
    start = time.monotonic()
    page = await context.new_page()
    page.on("pageerror", lambda exc: result.page_errors.append(str(exc)[:500]))
    try:
        await open_notebook(page, base, token, path, timeout=min(90.0, timeout))
        t0 = time.monotonic()
        result.open_seconds = t0 - start
        remaining = timeout - (t0 - start)
        final = await run_all(page, path, timeout=remaining)
        result.run_seconds = time.monotonic() - t0
        result.status = final
        for e in final["errors"]:
            tb = ANSI.sub("", e["traceback"])[-1500:]
            result.errors.append(f"cell {e['cell']}: {e['ename']}: {e['evalue']}\n{tb}")
        for e in final["widgetErrors"]:
            result.errors.append(f"cell {e['cell']}: widget failed to render: {e['text']}")
        if final["done"] != final["code"]:
            result.unfinished = (
                f"{final['done']} of {final['code']} code cells finished; not run: cells {final['pending']}"
            )
        shot = shots / f"{stem}.png"
        await page.screenshot(path=str(shot))
        result.screenshots.append(str(shot))
        if not result.errors:
            views = page.locator(WIDGET_OUTPUT)
            result.widget_views = await views.count()
            budget = max_controls
            for i, view in enumerate(await views.all()):
                if budget <= 0:
                    break
                scope = view  # its figures, or the text it writes when it has none
                per_view = await exercise_view(page, view, scope, shots, f"{stem}-w{i}", budget, move_timeout)
                budget -= len(per_view)
                result.interactions += per_view
    except Exception as exc:  # recorded and asserted by the test, with the screenshot
        result.failure = f"{type(exc).__name__}: {exc}"
        try:
            shot = shots / f"{stem}-failure.png"
            await page.screenshot(path=str(shot), timeout=10_000)
            result.screenshots.append(str(shot))
        except Exception:
            pass
    finally:
        try:
            await asyncio.wait_for(
                page.evaluate(
                    """async (path) => {
                    for (const w of window.jupyterapp.shell.widgets('main')) {
                      if (w.context && w.context.path === path) await w.sessionContext.shutdown();
                    }}""",
                    path,
                ),
                timeout=15,
            )
        except Exception:
            pass  # the server's shutdown ends any kernel left
        await page.close()
        result.seconds = time.monotonic() - start
    return result


async def run_notebooks(
    context: BrowserContext,
    base: str,
    token: str,
    paths: list[str],
    shots: Path,
    timeout: float,
    jobs: int,
    max_controls: dict[str, int],
) -> dict[str, NotebookResult]:
    """Every notebook through :func:`run_notebook`, ``jobs`` at a time, in the order given;
    ``max_controls`` says how many controls to move in each."""
    gate = asyncio.Semaphore(jobs)

    async def one(path: str) -> NotebookResult:
        async with gate:
            try:
                return await asyncio.wait_for(
                    run_notebook(context, base, token, path, shots, timeout, max_controls[path]), timeout + 60
                )
            except asyncio.TimeoutError:
                return NotebookResult(
                    path, seconds=timeout + 60, failure=f"timed out after {timeout + 60:.0f} s"
                )

    results = await asyncio.gather(*(one(p) for p in paths))
    return {r.name: r for r in results}


@dataclass
class VoilaResult:
    seconds: float = 0.0
    labels: list[str] = field(default_factory=list)  # control labels shown, in order
    figures: int = 0  # images on the page (the dashboard's and the static one)
    code_inputs: int = 0  # code cells whose input is shown (an app must show none)
    interactions: list[Interaction] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failure: str = ""


async def check_voila_app(
    context: BrowserContext, url: str, shots: Path, app_selector: str, move_labels: list[str], timeout: float
) -> VoilaResult:
    """Load a Voilà app, wait for the widget ``app_selector`` and its figure, read what it shows,
    move the controls labelled ``move_labels`` and record whether the figure changed."""
    result = VoilaResult()
    start = time.monotonic()
    page = await context.new_page()
    page.on("pageerror", lambda exc: result.page_errors.append(str(exc)[:300]))
    try:
        await page.goto(url, timeout=timeout * 1000)  # Voilà runs the notebook before answering
        app = page.locator(app_selector).first
        await app.wait_for(state="visible", timeout=timeout * 1000)
        await app.locator("img").first.wait_for(state="visible", timeout=60_000)
        await page.wait_for_function(
            "(el) => [...el.querySelectorAll('img')].every((i) => i.complete && i.naturalWidth > 0)",
            arg=await app.element_handle(),
            timeout=30_000,
        )
        result.labels = [label for label, _, _ in await controls_of(app)]
        result.figures = await page.locator(".jp-OutputArea-output img").count()
        result.code_inputs = await page.locator(".jp-CodeCell:not(.jp-mod-noInput), .cm-editor").count()
        await page.screenshot(path=str(shots / "voila-app.png"))
        result.interactions = await exercise_view(
            page, app, app, shots, "voila-app", len(move_labels), 30.0, only=move_labels
        )
        await app.screenshot(path=str(shots / "voila-app-after.png"))
    except Exception as exc:
        result.failure = f"{type(exc).__name__}: {exc}"
        try:
            await page.screenshot(path=str(shots / "voila-app-failure.png"), timeout=10_000)
        except Exception:
            pass
    finally:
        await page.close()
        result.seconds = time.monotonic() - start
    return result
