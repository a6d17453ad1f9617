"""Install size (and, with --time, install time) of the package and of each of its extras.

    python benchmarks/install_size.py [--time] [--extras onnx ijb eval test deploy]

Size: from the installed distributions' own file lists (RECORD) in the environment this runs in: the base
requirements' closure, then what each extra adds on top of it (its requirements' closure minus the base's). Needs
the extras installed here (`pip install -e '.[test,deploy]'` has them all); a missing one is reported as such.
Time (--time): `pip install -e .` in a fresh venv, then `pip install -e '.[extra]'` for each extra in turn in that
venv (each adds what the earlier ones did not), with pip's cache and package index as they are on this machine.
Prints one JSON object and a markdown table.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def closure(reqs):
    """Distribution names reachable from requirement strings, with markers evaluated here."""
    from packaging.requirements import Requirement
    seen, missing, todo = {}, set(), list(reqs)
    while todo:
        req = Requirement(todo.pop())
        if req.marker and not req.marker.evaluate(dict(extra='')):
            continue
        key = req.name.lower().replace('_', '-')
        if key in seen:
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            missing.add(key)
            continue
        seen[key] = dist
        for sub in dist.requires or []:
            marker = Requirement(sub).marker
            if marker is None or any(marker.evaluate(dict(extra=e)) for e in (req.extras or {''})):
                todo.append(sub)
    return seen, missing


def size_mb(dists) -> float:
    total = 0
    for dist in dists.values():
        for f in dist.files or []:
            try:
                total += dist.locate_file(f).stat().st_size
            except OSError:
                pass
    return round(total / 2 ** 20, 1)


def project_requirements():
    import tomllib
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
    return project['dependencies'], project['optional-dependencies']


def timed_installs(extras):
    """Seconds of `pip install -e .` in a fresh venv, then of `pip install -e '.[extra]'` for each extra in turn on
    top of it (each adds what the earlier ones have not)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, '-m', 'venv', f'{tmp}/venv'], check=True)
        for extra in ['(base)', *extras]:
            spec = '.' if extra == '(base)' else f'.[{extra}]'
            t0 = time.perf_counter()
            subprocess.run([f'{tmp}/venv/bin/pip', 'install', '-q', '-e', spec], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL)
            out[extra] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> dict:
    base_reqs, extras = project_requirements()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--extras', nargs='+', default=list(extras), choices=list(extras))
    p.add_argument('--time', action='store_true', help='also time a fresh install of each (minutes each)')
    args = p.parse_args(argv)
    base, base_missing = closure(base_reqs)
    rows = [dict(extra='(base)', packages=len(base), size_mb=size_mb(base), missing=sorted(base_missing))]
    for extra in args.extras:
        dists, missing = closure(extras[extra])
        added = {k: v for k, v in dists.items() if k not in base}
        cv2 = sorted(k for k in dists if k.startswith('opencv'))
        rows.append(dict(extra=extra, packages=len(added), size_mb=size_mb(added), missing=sorted(missing),
                         opencv=cv2))
    if args.time:
        seconds = timed_installs(args.extras)
        for row in rows:
            row['install_s'] = seconds[row['extra']]
    lines = ['| install | packages added | size added (MB) | ' + ('install time (s) |' if args.time else ''),
             '|---|---|---|' + ('---|' if args.time else '')]
    for r in rows:
        spec = "pip install -e ." if r['extra'] == '(base)' else f"+ [{r['extra']}]"
        lines.append(f"| {spec} | {r['packages']} | {r['size_mb']} | "
                     + (f"{r['install_s']} |" if args.time else ''))
    result = dict(rows=rows, table='\n'.join(lines), python=sys.version.split()[0])
    print(result['table'], file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
