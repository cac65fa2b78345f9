"""Drive MLflow's UI in headless Chromium (Debian's `chromium` binary, through Playwright for Python): open an
experiment's runs table or the compare view of some runs, read what a person would read there, and save full-page
screenshots. Waits are on visible text and ARIA roles (rows, cells, column headers), not on MLflow's CSS classes.

    with chromium_page() as page:
        open_runs_table(page, base_url, experiment_id, expand=["my-plan"], columns=["line.strategy", "knn_top1"])
        assert runs_table_cell(page, "simclr-joint/chunk-0", "line.strategy") == "joint"
        screenshot(page, "runs-table")

Checked against MLflow 3.17's UI: the runs table is `#/experiments/<id>/runs?workflowType=machine_learning`, the
compare view `#/compare-runs?runs=["<id1>","<id2>"]&experiments=["<exp id>"]` (JSON lists, as MLflow's own
`getCompareRunPageRoute` writes them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import pytest

# CI (.ci/run) installs Debian's chromium and sets this: then a missing browser fails the tests instead of skipping.
REQUIRE_BROWSER_ENV = "STREAMSSL_REQUIRE_BROWSER"
# Where screenshots go; the default is test-artifacts/ui/ at the repository root (git-ignored).
ARTIFACTS_ENV = "STREAMSSL_UI_ARTIFACTS"
ROOT = Path(__file__).resolve().parents[2]
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
TIMEOUT_MS = 60_000  # MLflow's UI bundle takes seconds to load and render on 2 busy cores
VIEWPORT = {"width": 2200, "height": 1200}  # wide enough that ag-grid renders the added param and metric columns
MAX_SHOT_HEIGHT = 12_000


def chromium_executable() -> str:
    """The system Chromium, or a skip (a failure when REQUIRE_BROWSER_ENV is set)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    missing = None
    if found is None:
        missing = "no chromium on PATH (Debian: apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright is not installed (pip install -e '.[test]')"
    if missing:
        if os.environ.get(REQUIRE_BROWSER_ENV):
            pytest.fail(f"{REQUIRE_BROWSER_ENV} is set but {missing}")
        pytest.skip(missing)
    return found


def artifacts_folder() -> Path:
    folder = Path(os.environ.get(ARTIFACTS_ENV) or ROOT / "test-artifacts" / "ui")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def chromium_page() -> Iterator:
    """A fresh headless Chromium page (its own profile, so no MLflow UI state from another test)."""
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root in a container; --disable-dev-shm-usage: a small /dev/shm there.
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an 'MLflow Assistant' panel beside the page, a moment after it renders (once a browser
    session: closed, it stays a small button in the corner); close it so the tables get the width."""
    close = page.get_by_role("button", name="Close", exact=True)
    panel = page.locator("div").filter(has=page.get_by_text("MLflow Assistant")).filter(has=close).last
    try:
        panel.wait_for(timeout=5_000)
    except Exception:  # playwright's TimeoutError: no assistant panel open
        return
    panel.get_by_role("button", name="Close", exact=True).first.click()
    panel.wait_for(state="detached")


def _run_link(page, run_name: str):
    """The link of a run's name inside the runs table (not the breadcrumb or side bar links of the same text)."""
    return page.get_by_role("gridcell").get_by_role("link", name=run_name, exact=True)


def open_runs_table(page, base_url: str, experiment_id: str, expand: Sequence[str] = (),
                    columns: Sequence[str] = ()) -> None:
    """Open the experiment's runs table in the model-training view, wait until its rows are there, expand the named
    parent runs (MLflow nests child runs under a collapsed parent) and add the named param/metric/tag columns
    through the table's 'Columns' selector. Both are toggles: this expects the table as a fresh browser profile
    (chromium_page) first shows it, parents collapsed and only the default columns."""
    page.goto(f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}")
    page.get_by_text("matching runs").wait_for()  # the table's footer: "<n> matching runs"
    _close_assistant(page)
    for parent in expand:
        link = _run_link(page, parent)
        link.wait_for()
        row = page.get_by_role("row").filter(has=link)
        # The name cell's only button is the expander (its colour swatch is a label, its name a link).
        row.get_by_role("gridcell").get_by_role("button").first.click()
    if columns:
        page.get_by_role("button", name="Columns", exact=True).click()
        search = page.get_by_placeholder("Search columns")
        tree = page.get_by_test_id("column-selector-tree")
        for column in columns:
            search.fill(column)
            # The selector highlights the match in every name containing it (best_<strong>knn_top1</strong>), so a
            # text match would also hit the longer names: take the entry whose whole label is the column.
            whole = re.compile(rf"^{re.escape(column)}$")
            tree.locator("span").filter(has_text=whole).last.click()
        page.keyboard.press("Escape")
        for column in columns:
            _column_header(page, column).wait_for()


def _column_header(page, column: str):
    # ag-grid's header cell carries aria-colindex; an inner element repeats the role without it.
    return page.get_by_role("columnheader", name=column, exact=True).and_(page.locator("[aria-colindex]")).first


def runs_table_cell(page, run_name: str, column: str) -> str:
    """The text of one cell of the runs table: the row of the run named `run_name`, the column headed `column`.
    ag-grid splits a row between a pinned part (the name) and a scrolling part (the values); both carry the row's
    aria-rowindex, and cells carry their column's aria-colindex."""
    link = _run_link(page, run_name)
    link.wait_for()
    row_index = page.get_by_role("row").filter(has=link).first.get_attribute("aria-rowindex")
    col_index = _column_header(page, column).get_attribute("aria-colindex")
    cell = page.locator(f'[role="row"][aria-rowindex="{row_index}"] [role="gridcell"][aria-colindex="{col_index}"]')
    return cell.first.inner_text().strip()


def open_compare(page, base_url: str, experiment_id: str | Sequence[str], run_ids: Sequence[str],
                 diff_only: Sequence[str] = ()) -> None:
    """Open MLflow's compare view of the runs and wait until its parameter and metric tables are rendered; turn on
    'Show diff only' in the named sections ("Parameters", "Metrics", "Tags")."""
    experiments = [experiment_id] if isinstance(experiment_id, str) else list(experiment_id)
    runs, exps = json.dumps(list(run_ids), separators=(",", ":")), json.dumps(experiments, separators=(",", ":"))
    page.goto(f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={exps}&{MODEL_TRAINING_VIEW}")
    page.get_by_text(f"Comparing {len(run_ids)} Runs").wait_for()
    _close_assistant(page)
    for run_id in run_ids:  # the "Run ID:" row links every run
        page.get_by_role("link", name=run_id, exact=True).wait_for()
    page.get_by_text("Parameters", exact=True).last.wait_for()
    page.get_by_text("Metrics", exact=True).last.wait_for()
    for section in diff_only:
        switch = page.get_by_role("switch", name=f"{section} - Show diff only", exact=True)
        switch.click()
        page.wait_for_function("s => s.getAttribute('aria-checked') === 'true'", arg=switch.element_handle())


def compare_param(page, name: str) -> list[str]:
    """The values of one parameter in the compare view's parameter table, one per run, in the runs' order."""
    row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=name, exact=True)).first
    row.wait_for()
    cells = row.get_by_role("cell")
    return [cells.nth(i).inner_text().strip() for i in range(cells.count())]


# From a metric name's link in the compare view to the grid of the runs' values beside it.
_VALUES_GRID = ("a => { const own = a.closest('[role=grid]'); let box = own.parentElement;"
                " while (box.querySelectorAll('[role=grid]').length < 2) box = box.parentElement;"
                " return [...box.querySelectorAll('[role=grid]')].find(g => g !== own); }")


def compare_metric(page, name: str) -> list[str]:
    """The values of one metric in the compare view, one per run, in the runs' order (as MLflow rounds them), read
    off the screen: the cells level with the metric's name. That table is two virtualized grids 300 px high: the
    names, and beside them the runs' values side by side; scrolling the values grid scrolls the names along, one
    scroll event late in MLflow 3.17, so the grid is scrolled to just above the metric's row, then onto it."""
    names = page.get_by_role("grid").filter(has=page.get_by_title("Plot chart")).first
    link = names.get_by_role("link", name=name, exact=True).first
    link.wait_for()
    target = link.evaluate("a => Math.max(0, a.parentElement.offsetTop - 90)")
    for top in (max(0, target - 1), target):
        link.evaluate(f"(a, top) => {{ ({_VALUES_GRID})(a).scrollTop = top; }}", top)
        page.wait_for_timeout(300)
    # the names grid has caught up: the metric's cell sits where its row is, counted from the top of the values grid
    page.wait_for_function(f"a => Math.abs(a.parentElement.getBoundingClientRect().top - ({_VALUES_GRID})(a)"
                           f".getBoundingClientRect().top - a.parentElement.offsetTop + ({_VALUES_GRID})(a).scrollTop) < 3",
                           arg=link.element_handle())
    return link.evaluate(f"""(a) => {{
        const top = a.parentElement.getBoundingClientRect().top;
        const cells = [];
        for (const cell of ({_VALUES_GRID})(a).querySelectorAll('[role="rowgroup"] > *')) {{
            const rect = cell.getBoundingClientRect();
            if (Math.abs(rect.top - top) < 3) cells.push([rect.left, cell.innerText.trim()]);
        }}
        return cells.sort((x, y) => x[0] - y[0]).map(c => c[1]);
    }}""")


# How much taller than the window the page's own scrolling panels are (MLflow scrolls inside its main panel, not the
# window; panels smaller than half the window, like the compare view's 300 px metrics grid, keep their own scroll).
_OVERFLOW = """() => Math.max(0, ...Array.from(document.querySelectorAll('*'), e => {
    const style = getComputedStyle(e);
    const scrolls = ['auto', 'scroll'].includes(style.overflowY) || e === document.scrollingElement;
    return scrolls && e.clientHeight >= window.innerHeight / 2 ? e.scrollHeight - e.clientHeight : 0;
}))"""


def screenshot(page, name: str, folder: Path | None = None) -> Path:
    """A full-page PNG of what the page shows, its main panel unrolled: the window is made taller until nothing
    large scrolls (up to MAX_SHOT_HEIGHT px), shot, and set back."""
    folder = folder or artifacts_folder()
    height = VIEWPORT["height"]
    for _ in range(4):
        overflow = page.evaluate(_OVERFLOW)
        if overflow <= 0 or height >= MAX_SHOT_HEIGHT:
            break
        height = min(height + overflow, MAX_SHOT_HEIGHT)
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        page.wait_for_timeout(300)  # let the page lay out (and virtualized tables render) the rows now in view
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(VIEWPORT)
    return path
