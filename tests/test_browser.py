"""The course in a real JupyterLab, driven by headless Chromium: chapter 01 runs top to bottom
without an error and draws its figures, an exercise's first stub stops a run with its error, and
chapter 06's capacity explorer (ipywidgets) redraws its figure when its slider moves.
The notebooks are copies in a temporary folder (JupyterLab autosaves); the screenshots are kept
in .test-artifacts/.

Needs Chromium at /usr/bin/chromium (Debian's package; .ci/run installs it) and the `playwright`
Python package (the dev extra); skipped with the reason otherwise.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / ".test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_ALL_TIMEOUT_MS = 240_000

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 serving copies of the notebooks; yields its base URL and token."""
    root = tmp_path_factory.mktemp("lab")
    for name in ("course/01_numpy_gate.ipynb", "exercises/01_numpy_gate.ipynb", "course/06_capacity.ipynb"):
        target = root / name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, target)
    # user settings of this server only: render every cell (no windowing), so the page shows all
    # outputs, and no news pop-up over the screenshots
    settings = tmp_path_factory.mktemp("lab-settings") / "@jupyterlab"
    for plugin, values in (("notebook-extension/tracker", {"windowingMode": "none"}),
                           ("apputils-extension/notification", {"fetchNews": "false"})):
        (settings / plugin).parent.mkdir(parents=True, exist_ok=True)
        (settings / f"{plugin}.jupyterlab-settings").write_text(json.dumps(values))
    # the kernels inherit this environment: without MPLBACKEND (Agg draws nothing in a notebook), as a learner has it
    env = {name: value for name, value in os.environ.items() if name != "MPLBACKEND"}
    env["JUPYTERLAB_SETTINGS_DIR"] = str(settings.parent)
    port, token = free_port(), secrets.token_hex(16)
    log = open(root / "jupyter.log", "w")  # noqa: SIM115 (closed below, after the server)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.expose_app_in_browser=True"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"jupyter lab exited with {server.returncode}: {(root / 'jupyter.log').read_text()}")
                time.sleep(0.5)
        else:
            pytest.fail("jupyter lab did not answer within 60 s")
        yield base, token
    finally:
        server.kill()  # by its PID
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


VISIBLE_NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"
NOTEBOOK_STATE = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const cells = [...panel.content.model.cells].filter(cell => cell.type === 'code');
    return {kernel: panel.sessionContext.kernelDisplayStatus,
            unexecuted: cells.filter(cell => cell.executionCount === null).length,
            errors: cells.flatMap(cell => [...Array(cell.outputs.length).keys()]
                                              .map(i => cell.outputs.get(i).toJSON()))
                         .filter(output => output.output_type === 'error')
                         .map(output => output.ename + ': ' + output.evalue)};
}"""


def wait_until(page, condition: str, timeout_ms: int = RUN_ALL_TIMEOUT_MS) -> None:
    """Wait until the JavaScript `condition` on `state` (NOTEBOOK_STATE of the open notebook) holds."""
    page.wait_for_function(f"() => {{ const state = ({NOTEBOOK_STATE})(); return {condition}; }}", timeout=timeout_ms)


def open_notebook(browser, jupyter, path: str):
    """A page showing the notebook at `path`, its kernel started and idle."""
    base, token = jupyter
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{base}/lab/tree/{path}?reset&token={token}")  # reset: no tabs restored from the last page
    page.wait_for_selector(f"{VISIBLE_NOTEBOOK} .jp-Cell", timeout=120_000)
    wait_until(page, "state.kernel === 'idle'", timeout_ms=120_000)
    return page


def test_chapter_01_runs_all_cells_in_jupyterlab_without_errors_and_draws_figures(browser, jupyter):
    page = open_notebook(browser, jupyter, "course/01_numpy_gate.ipynb")
    page.evaluate("window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    assert page.locator(f"{VISIBLE_NOTEBOOK} .jp-RenderedImage img").count() == 0
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    wait_until(page, "state.unexecuted === 0 && state.kernel === 'idle'")
    state = page.evaluate(f"({NOTEBOOK_STATE})()")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chapter01_after_run_all.png"))
    assert state["errors"] == []
    figure = page.wait_for_selector(f"{VISIBLE_NOTEBOOK} .jp-RenderedImage img", state="attached", timeout=60_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=figure, timeout=60_000)
    page.close()


def test_an_exercise_run_all_stops_at_its_first_stub_and_the_error_is_seen(browser, jupyter):
    """The same error detection on a notebook that must fail: the first locked check meets a stub."""
    page = open_notebook(browser, jupyter, "exercises/01_numpy_gate.ipynb")
    assert "from minimoe.checks import ch01" in page.locator(VISIBLE_NOTEBOOK).inner_text()
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    wait_until(page, "state.errors.length > 0 && state.kernel === 'idle'")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "exercise01_run_all.png"))
    assert page.evaluate(f"({NOTEBOOK_STATE})()")["errors"] == ["CheckFailure: task 1.1: not implemented yet"]
    page.close()


EXPLORER = f"{VISIBLE_NOTEBOOK} .jp-OutputArea-output .widget-vbox"  # minimoe.explore.Explorer's box
EXPLORER_IMAGE = f"{EXPLORER} .widget-output img"


def explorer_image(page) -> str:
    """The src (a data: URL of the PNG) of the explorer's figure, once it has loaded."""
    image = page.wait_for_selector(EXPLORER_IMAGE, state="attached", timeout=60_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=image, timeout=60_000)
    return image.get_attribute("src")


def test_chapter_06s_capacity_explorer_redraws_its_figure_when_the_slider_moves(browser, jupyter):
    page = open_notebook(browser, jupyter, "course/06_capacity.ipynb")
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    wait_until(page, "state.unexecuted === 0 && state.kernel === 'idle'")
    assert page.evaluate(f"({NOTEBOOK_STATE})()")["errors"] == []
    explorer = page.locator(EXPLORER).first
    explorer.scroll_into_view_if_needed()
    before = explorer_image(page)
    readout = explorer.locator(".widget-readout").first
    assert readout.inner_text().strip() == "1.0"  # the explorer starts at capacity factor 1
    # one step of the slider to the left with the keyboard, as a reader would (the handle takes focus)
    handle = explorer.locator(".noUi-handle").first
    handle.focus()
    handle.press("ArrowLeft")
    page.wait_for_function("text => document.querySelector(text) && "
                           "document.querySelector(text).innerText.trim() === '0.75'",
                           arg=f"{EXPLORER} .widget-readout", timeout=30_000)
    wait_until(page, "state.kernel === 'idle'", timeout_ms=60_000)
    page.wait_for_function("([selector, old]) => { const img = document.querySelector(selector); "
                           "return img && img.complete && img.naturalWidth > 100 && img.src !== old; }",
                           arg=[EXPLORER_IMAGE, before], timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    explorer.screenshot(path=str(ARTIFACTS / "chapter06_explorer_after_slider.png"))
    assert explorer_image(page) != before
    assert page.evaluate(f"({NOTEBOOK_STATE})()")["errors"] == []
    page.close()
