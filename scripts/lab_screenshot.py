"""Look at the run explorer as a person does: start JupyterLab headless (a free port, a token, a throw-away config),
open `nbs/explore.ipynb` with its parameters set, run every cell with the live kernel (so the threshold slider is a real
ipywidgets slider), and screenshot chosen cells with their outputs at laptop and phone widths.

    python scripts/lab_screenshot.py nbs/explore.ipynb --out docs/screenshots -p experiment demo
    python scripts/lab_screenshot.py nbs/explore.ipynb -p experiment smoke -p other smoke-ls --shots compare --tag smoke

Needs `make install-dev` plus the `[lab]` extras (jupyterlab, ipywidgets), the `playwright` Python package (driver
only) and Debian's `chromium` (`apt-get install chromium`), as scripts/report_check.py. Not part of `make test`.
"""
from __future__ import annotations
import argparse, os, secrets, shutil, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_check import CHROMIUM_ARGS, VIEWPORTS, _shrink   # the same browser flags, screen sizes and PNG shrinking

# shot name -> a piece of source that finds its cell (the cell and its output are screenshotted from the cell's top)
SHOTS = {'histogram': 'threshold_explorer(', 'gallery': '.gallery(', 'per_class': "run.per_class('train'",
         'tail': 'run.tail_plot(', 'compare': 'compare(run, '}
MOVE_STEPS = 20   # slider steps of 0.01 the threshold is moved by for the `_moved` screenshot
STARTED = "() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')).some(p => p.textContent.trim() !== '[ ]:')"
ALL_DONE = """() => {
  const prompts = Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')).map(p => p.textContent.trim());
  return prompts.length > 0 && prompts.every(t => /^\\[\\d+\\]:$/.test(t));
}"""


def free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def parameterized(nb_path:Path, params:dict, folder:Path)->Path:
    "A copy of the notebook in `folder` with papermill's injected-parameters cell, as `papermill -p` writes it"
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    nb = parameterize_notebook(load_notebook_node(str(nb_path)), params)
    out = folder/nb_path.name
    nbformat.write(nb, out)
    return out


def start_lab(root:Path, port:int, token:str, home:Path)->subprocess.Popen:
    "jupyter lab serving `root`, its settings and workspaces in `home` (none of the user's), ready when this returns"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home/'config'), JUPYTERLAB_WORKSPACES_DIR=str(home/'workspaces'),
               JUPYTERLAB_SETTINGS_DIR=str(home/'settings'), JUPYTER_RUNTIME_DIR=str(home/'runtime'))
    settings = {  # no "news" toast over the notebook; every cell rendered (windowing estimates heights, and a cell
                  # scrolled to would move as the cells above it render)
        'apputils-extension/notification': '{"fetchNews": "false", "checkForUpdates": false}',
        'notebook-extension/tracker': '{"windowingMode": "none"}'}
    for name, text in settings.items():
        f = home/'settings'/'@jupyterlab'/f'{name}.jupyterlab-settings'
        f.parent.mkdir(parents=True, exist_ok=True); f.write_text(text)
    jupyter = Path(sys.executable).parent/'jupyter'
    proc = subprocess.Popen([str(jupyter), 'lab', '--no-browser', f'--port={port}', '--ip=127.0.0.1',
                             f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}',
                             *(['--allow-root'] if os.geteuid() == 0 else [])],   # containers run as root
                            env=env, stdout=subprocess.DEVNULL, stderr=open(home/'lab.log', 'w'))
    for _ in range(120):
        try:
            urllib.request.urlopen(f'http://127.0.0.1:{port}/api/status?token={token}', timeout=2); return proc
        except OSError: time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"jupyter lab did not answer on port {port} in 60 s; its log ends:\n"
                       + '\n'.join((home/'lab.log').read_text().splitlines()[-15:]))


def run_all(page, timeout_s:float):
    "Run every cell through the command palette and wait until each code cell has its execution number"
    page.wait_for_selector('.jp-Notebook .jp-Cell', timeout=60_000)
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=120_000)
    # the notebook toolbar's "restart the kernel and run all cells" (there at every width, unlike the menu bar); a click
    # while the kernel is still connecting can be lost, so it is repeated until a cell starts
    for attempt in range(3):
        page.locator('.jp-NotebookPanel-toolbar [data-command="notebook:restart-run-all"]').first.click()
        page.locator('.jp-Dialog .jp-mod-accept').click()
        try: page.wait_for_function(STARTED, timeout=30_000, polling=500); break
        except Exception:
            if attempt == 2: raise RuntimeError('restart-and-run-all started no cell in 3 tries') from None
    try: page.wait_for_function(ALL_DONE, timeout=timeout_s * 1000, polling=1000)
    except Exception:
        prompts = page.evaluate("() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')).map(p => p.textContent)")
        page.screenshot(path='lab_screenshot_failed.png')
        raise RuntimeError(f"lab_screenshot_failed.png: the cells did not all run in {timeout_s:.0f} s; their prompts: {prompts}") from None
    time.sleep(2)   # the last figures and widgets render


def shoot(url:str, shots:list[str], out:Path, tag:str, chromium:str, timeout_s:float)->list[Path]:
    "Run the notebook once at laptop width, then screenshot each shot's cell at each viewport (the page re-laid out)"
    from playwright.sync_api import sync_playwright
    written = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=dict(zip(('width', 'height'), VIEWPORTS['laptop'])))
        page.goto(url, wait_until='load')
        run_all(page, timeout_s)
        page.keyboard.press('Control+b')   # the file browser closed: the notebook gets the width
        for view, (w, h) in VIEWPORTS.items():
            page.set_viewport_size({'width': w, 'height': h}); time.sleep(2)
            for shot in shots:
                cell = page.locator('.jp-Notebook .jp-CodeCell', has_text=SHOTS[shot]).last
                for _ in range(2): cell.evaluate('e => e.scrollIntoView({block: "start"})'); time.sleep(1)
                f = out/f'{tag}_{view}_{shot}.png'
                page.screenshot(path=str(f)); _shrink(f); written.append(f)
                handle = cell.locator('.widget-slider .noUi-handle')
                if view == 'laptop' and handle.count():   # the slider is live: move it and show the figure and table follow
                    handle.first.focus()
                    for _ in range(MOVE_STEPS): page.keyboard.press('ArrowLeft')
                    time.sleep(6)
                    f = out/f'{tag}_{view}_{shot}_moved.png'
                    page.screenshot(path=str(f)); _shrink(f); written.append(f)
        browser.close()
    return written


def main(argv=None)->int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('notebook', type=Path)
    ap.add_argument('--out', type=Path, default=Path('docs/screenshots'))
    ap.add_argument('-p', nargs=2, action='append', default=[], metavar=('NAME', 'VALUE'), help='a notebook parameter')
    ap.add_argument('--shots', default='histogram,gallery,per_class,compare', help=f"cells to show: {', '.join(SHOTS)}")
    ap.add_argument('--tag', default='explore', help='file names: <tag>_<laptop|phone>_<shot>.png')
    ap.add_argument('--timeout', type=float, default=300, help='seconds to wait for every cell to run')
    a = ap.parse_args(argv)
    chromium = shutil.which('chromium')
    if chromium is None: print('lab_screenshot needs Chromium: apt-get install chromium', file=sys.stderr); return 2
    shots = a.shots.split(',')
    if bad := [s for s in shots if s not in SHOTS]: ap.error(f"unknown shot {bad[0]!r}; shots: {', '.join(SHOTS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp); (tmp/'nb').mkdir(); (tmp/'home').mkdir()
        nb = parameterized(a.notebook, {k: v for k, v in a.p}, tmp/'nb')
        port, token = free_port(), secrets.token_hex(16)
        lab = start_lab(tmp/'nb', port, token, tmp/'home')
        try:
            files = shoot(f'http://127.0.0.1:{port}/lab/tree/{nb.name}?token={token}', shots, a.out.resolve(),
                          a.tag, chromium, a.timeout)
        finally:
            lab.terminate()
            try: lab.wait(20)
            except subprocess.TimeoutExpired: lab.kill()
    for f in files: print(f)
    return 0


if __name__ == '__main__':
    sys.exit(main())
