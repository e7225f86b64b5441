"""Where `make demo`'s time goes: run the pipeline of a parameter file (default params/demo.yaml) from nothing into a
scratch runs/reports directory, print the seconds of the data stage and of every stage (kernel start-up included, as a
user waits for it), and write them as JSON. The install is not in it: time `make demo` in a fresh clone for that.

    python benchmarks/demo_time.py                          # params/demo.yaml, about 10 minutes on 2 CPU cores
    python benchmarks/demo_time.py --params params/smoke.yaml --out /tmp/smoke_time.json
"""
from __future__ import annotations
import argparse, re, subprocess, sys, tempfile, time
from pathlib import Path
import yaml

from aliprod.core import project_root
from aliprod.rundirs import atomic_write_json, hardware

STAGE = re.compile(r'^(\d\d:\d\d:\d\d) stage (\d+)/(\d+) (\w+):')
DONE = re.compile(r'^(\d\d:\d\d:\d\d) (\w+): done in (\d+) s')
# the data stage's closing line (its total); 'data: generated ... in Xs' before it times the generation alone
DATA = re.compile(r'^(\d\d:\d\d:\d\d) data: [\d,]+ images, \d+ classes, .* in ([\d.]+)s$')


def run(params:Path, work:Path, in_process:bool=False)->tuple[list[dict], float, list[str]]:
    "Run the pipeline into `work`; (rows of stage and seconds, total seconds, the output lines)"
    cfg = yaml.safe_load(params.read_text())
    cfg['runs_dir'], cfg['reports_dir'] = str(work/'runs'), str(work/'reports')
    p = work/params.name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [str(Path(sys.executable).parent/'aliprod'), 'run', str(p), *(['--in-process'] if in_process else [])]
    t0, lines = time.time(), []
    with subprocess.Popen(cmd, cwd=project_root(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line.rstrip('\n')); print(line, end='', flush=True)
    total = time.time() - t0
    if proc.returncode: raise SystemExit(f"aliprod run exited {proc.returncode}")
    rows = [{'stage': 'data', 'seconds': next((float(m[2]) for l in lines if (m := DATA.match(l))), None)}]
    rows += [{'stage': m[2], 'seconds': float(m[3])} for l in lines if (m := DONE.match(l)) and m[2] != 'data']
    return rows, total, lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--params', default=str(project_root()/'params'/'demo.yaml'))
    ap.add_argument('--in-process', action='store_true', help='call the stage functions in one process (no notebooks, no kernels)')
    ap.add_argument('--out', default=str(project_root()/'benchmarks'/'results'/'demo_time.json'))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix='aliprod-demo-time-') as d:
        rows, total, lines = run(Path(a.params), Path(d), a.in_process)
    print(f"\n| stage | seconds | share |\n|---|---:|---:|")
    for r in rows: print(f"| {r['stage']} | {r['seconds'] or 0:.0f} | {100 * (r['seconds'] or 0) / total:.0f}% |")
    rest = total - sum(r['seconds'] or 0 for r in rows)
    print(f"| start-up, HTML pages, between stages | {rest:.0f} | {100 * rest / total:.0f}% |\n| **total** | **{total:.0f}** | |")
    atomic_write_json(a.out, {'params': a.params, 'in_process': a.in_process, 'hardware': hardware(), 'stages': rows, 'total_s': total,
                              'first_lines': lines[:30]})
    print(f"\nwrote {a.out}")


if __name__ == '__main__': main()
