"""Look at a report as a person does: open `reports/<experiment>/index.html` in headless Chromium at laptop and phone
widths, take full-page screenshots, and check that every figure loads, nothing is wider than the screen, no code shows,
the final system, its choices, the chain and the tail-accuracy plot are above the fold on a laptop, and no paragraph on
the first screen (of either width) runs longer than three lines.

    python scripts/report_check.py reports/demo --out docs/screenshots      (make report-check)

Needs Debian's `chromium` (`apt-get install chromium`) and the `playwright` Python package (driver only; the browser
is the system one). Not part of `make test`: CI has no browser.
"""
from __future__ import annotations
import argparse, json, shutil, sys
from pathlib import Path

VIEWPORTS = {'laptop': (1366, 768), 'phone': (390, 844)}
# what a reader must see without scrolling on a laptop: element ids the report gives its sections
ABOVE_THE_FOLD = ('final-system', 'choices', 'chain', 'tail-accuracy')
MAX_LINES = 3   # a paragraph on the first screen longer than this is read as a wall of text
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']

PROBE = """() => {
  const broken = Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));
  const vw = document.documentElement.clientWidth;
  // a wide table inside a horizontally scrolling box (the report's .wide) scrolls there: the page itself stays within the screen
  const scrolls = e => { for (let p = e.parentElement; p; p = p.parentElement) { const o = getComputedStyle(p).overflowX;
                                                                               if (o === 'auto' || o === 'scroll') return true; } return false; };
  const wide = Array.from(document.querySelectorAll('table, img, pre')).filter(e => e.getBoundingClientRect().right > vw + 1 && !scrolls(e))
                    .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + ' ' + Math.round(e.getBoundingClientRect().width) + 'px');
  const code = document.querySelectorAll('.jp-InputArea, .input_area, div.highlight pre').length;
  const pos = {};
  const bottoms = {};
  for (const id of %s) { const e = document.getElementById(id); pos[id] = e ? Math.round(e.getBoundingClientRect().top + window.scrollY) : null;
                         bottoms[id] = e ? Math.round(e.getBoundingClientRect().bottom + window.scrollY) : null; }
  // lines of a text block: its line boxes, counted from the rectangles of its text (inline pieces of one line overlap)
  const lines = e => { const r = document.createRange(); r.selectNodeContents(e);
    const rs = Array.from(r.getClientRects()).filter(x => x.width > 0 && x.height > 0).sort((a, b) => a.top - b.top);
    let n = 0, bottom = -1e9;
    for (const x of rs) { if (x.top >= bottom - 2) { n++; bottom = x.bottom; } else bottom = Math.max(bottom, x.bottom); }
    return n; };
  const vh = window.innerHeight;
  const long = Array.from(document.querySelectorAll('p, li, dd, dt, figcaption, blockquote, summary'))
    .filter(e => { const b = e.getBoundingClientRect(); return b.top < vh && b.bottom > 0 && b.height > 0; })
    .map(e => ({text: e.textContent.trim().slice(0, 60), lines: lines(e)})).filter(x => x.lines > %d);
  return {broken, wide, code, pos, bottoms, long, height: document.documentElement.scrollHeight, page_width: document.documentElement.scrollWidth, vw};
}""" % (json.dumps(list(ABOVE_THE_FOLD)), MAX_LINES)


def _shrink(png:Path):
    "Rewrite a screenshot as a 256-colour PNG (a few times smaller; text and plots stay legible), when Pillow is there"
    try: from PIL import Image
    except ImportError: return
    with Image.open(png) as im: small = im.convert('RGB').quantize(256)
    small.save(png, optimize=True)


def check(report:Path, out:Path, chromium:str)->dict:
    "Screenshots and findings per viewport"
    from playwright.sync_api import sync_playwright
    page_url = (report/'index.html').resolve().as_uri()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        for name, (w, h) in VIEWPORTS.items():
            page = browser.new_page(viewport={'width': w, 'height': h})
            page.goto(page_url, wait_until='load')
            r = page.evaluate(PROBE)
            shot, fold = out/f'{report.name}_{name}.png', out/f'{report.name}_{name}_fold.png'
            page.screenshot(path=str(shot), full_page=True)
            page.screenshot(path=str(fold))   # what a person sees before scrolling
            for f in (shot, fold): _shrink(f)
            problems = [f'broken image {s}' for s in r['broken']] + [f'wider than the screen: {e}' for e in r['wide']]
            if r['page_width'] > r['vw'] + 1: problems.append(f"the page is {r['page_width']}px wide on a {r['vw']}px screen")
            if r['code']: problems.append(f"{r['code']} code cells visible")
            problems += [f"a paragraph of {x['lines']} lines on the first screen (at most {MAX_LINES}): {x['text']!r}..." for x in r['long']]
            if name == 'laptop':
                for id_, top in r['pos'].items():
                    if top is None: problems.append(f'no element #{id_}')
                    elif r['bottoms'][id_] > h: problems.append(f"#{id_} ends at {r['bottoms'][id_]}px, below the fold ({h}px)")
            results[name] = {'viewport': [w, h], 'screenshot': str(shot), 'page_height': r['height'], 'positions': r['pos'], 'problems': problems}
            page.close()
        browser.close()
    return results


def main(argv=None)->int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('report', nargs='?', default='reports/demo', help='report directory holding index.html')
    ap.add_argument('--out', default='docs/screenshots', help='where the PNG screenshots go')
    ap.add_argument('--chromium', default=shutil.which('chromium') or '/usr/bin/chromium')
    a = ap.parse_args(argv)
    report = Path(a.report)
    if not (report/'index.html').is_file(): print(f'report_check: {report}/index.html not found; run the pipeline first (make demo)', file=sys.stderr); return 2
    if not Path(a.chromium).exists(): print(f'report_check: no Chromium at {a.chromium}; apt-get install chromium', file=sys.stderr); return 2
    res = check(report, Path(a.out), a.chromium)
    print(f"{'viewport':<8} {'size':>10} {'page height':>12}  problems")
    for name, r in res.items():
        print(f"{name:<8} {'x'.join(map(str, r['viewport'])):>10} {r['page_height']:>12}  {'; '.join(r['problems']) or 'none'}   -> {r['screenshot']}")
    (Path(a.out)/f'{report.name}_check.json').write_text(json.dumps(res, indent=1) + '\n')
    return 1 if any(r['problems'] for r in res.values()) else 0


if __name__ == '__main__':
    sys.exit(main())
