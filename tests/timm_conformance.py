"""timm's own model tests on every model this project registers: `python -m tests.timm_conformance`.

    python -m tests.timm_conformance                      # timm's tests/test_models.py of the installed timm
    python -m tests.timm_conformance --timm-tests ~/src/pytorch-image-models     # from a timm source checkout

Takes `tests/test_models.py` of the **installed** timm version from that version's source distribution (downloaded
once with pip from the configured package index and cached under `--cache`; no copy of timm's code lives in this
repository, so a new timm release is tested as released), and runs it unchanged with pytest, its collection
restricted to this project's models (every `mobileone_112_*` name and tag, `mobilefacenet`):

1. as released;
2. with this project's model modules added to the file's `FEAT_INTER_FILTERS` list (the models whose
   `forward_intermediates` and feature getter timm tests), the only line changed; skipped with a message where the
   file has no such list.

The pretrained tests (`test_model_load_pretrained`: `in_chans=1`, `num_classes=5` / `0`;
`test_model_features_pretrained`) run offline against a local Hub cache laid out as the Hub's
(`HF_HUB_CACHE`, `HF_HUB_OFFLINE=1`): the `apple_in1k` tags point at timm's `timm/mobileone_s*.apple_in1k` repos,
whose files are generated here with those names, keys and shapes (timm's `mobileone_s*` state dicts, random
values): they test the loading path, not Apple's weights. Prints one JSON object on stdout (counts per pass,
every failure and skip with its reason); progress on stderr. Exit code 0: nothing failed; 1: a test failed; 2: a
usage error (no timm tests to be had).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from timm_mobileone.cli import cli
from timm_mobileone.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MODULES = ('mobileone_112', 'mobilefacenet')  # the project's model modules, as timm's registry names them
FEAT_INTER_LINE = 'FEAT_INTER_FILTERS = ['

# the conftest of the run folder: registers the project's models before timm's test module lists them, keeps only
# their tests, and records every outcome
CONFTEST = '''
import json, os
import timm_mobileone  # noqa: F401  (registers the models before test_models.py lists them at import)
import timm

OURS = set(timm.list_models(module=%(modules)r))
_RESULTS = []
_list_models = timm.list_models


def _ours_only(*args, **kwargs):
    # test_models.py parametrizes its tests with timm.list_models(...) at import: answering with this project's
    # models alone keeps collection to them (thousands of timm models otherwise), the test functions untouched
    return [n for n in _list_models(*args, **kwargs) if n.split('.')[0] in OURS]


timm.list_models = _ours_only


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        name = str(params.get('model_name', '')).split('.')[0]
        (keep if name in OURS else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_runtest_logreport(report):
    if report.when == 'call' or report.outcome != 'passed':
        reason = ''
        if report.outcome == 'skipped' and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2])
        elif report.outcome == 'failed':
            reason = (getattr(report.longrepr, 'reprcrash', None) and report.longrepr.reprcrash.message) or \\
                str(report.longrepr).strip().splitlines()[-1]
        _RESULTS.append(dict(test=report.nodeid, when=report.when, outcome=report.outcome,
                             reason=reason.splitlines()[0][:300] if reason else ''))


def pytest_sessionfinish(session):
    if os.environ.get('PYTEST_XDIST_WORKER'):  # with workers, the controller receives every report
        return
    with open(os.environ['CONFORMANCE_RESULTS'], 'w') as f:
        json.dump(_RESULTS, f)
'''

PYTEST_INI = '''[pytest]
markers =
    base
    cfg
    torchscript
    features
    fxforward
    fxbackward
    forward
    backward
    timeout
filterwarnings =
    ignore::DeprecationWarning
    ignore::FutureWarning
    ignore::UserWarning
'''


def default_cache() -> Path:
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'timm-mobileone' / 'timm-tests'


def timm_tests(version: str, given: str, cache: Path) -> Path:
    """`tests/test_models.py` of timm `version`: from `given` (a file, a timm checkout or its tests folder), the
    cache, or the version's source distribution (pip download, then cached)."""
    if given:
        path = Path(given)
        for candidate in (path, path / 'test_models.py', path / 'tests' / 'test_models.py'):
            if candidate.is_file():
                return candidate
        raise UserError(f'--timm-tests {given}: no test_models.py there (give a timm source checkout, its tests '
                         f'folder or the file)')
    cached = cache / version / 'test_models.py'
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        print(f'downloading the timm {version} source distribution for its tests/test_models.py', file=sys.stderr)
        proc = subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary', 'timm',
                               f'timm=={version}', '-d', tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob('timm-*.tar.gz'))
        if proc.returncode != 0 or not sdists:
            why = (proc.stderr.strip().splitlines() or ['no source distribution'])[-1][:200]
            raise UserError(f'no cached {cached} and the timm {version} source distribution could not be '
                             f'downloaded ({why}); point the runner at a timm source checkout: --timm-tests PATH')
        with tarfile.open(sdists[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith('/tests/test_models.py')), None)
            if member is None:
                raise UserError(f'{sdists[0].name} holds no tests/test_models.py; use --timm-tests PATH')
            data = tar.extractfile(member).read()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = cached.with_suffix('.tmp')
        tmp_file.write_bytes(data)
        tmp_file.replace(cached)
    except OSError as e:  # a read-only home: run from a temporary copy, cache nothing
        print(f'warning: cannot cache {cached} ({e.strerror or e}); using a temporary copy', file=sys.stderr)
        cached = Path(tempfile.mkdtemp(prefix='timm-tests-')) / 'test_models.py'
        cached.write_bytes(data)
    return cached


def populate_hub_cache(cache: Path) -> List[str]:
    """Hub-layout cache entries for every pretrained tag of the project's models that points at a Hub repo: the
    repo's `model.safetensors` with the keys and shapes of the timm model it names (random values)."""
    import timm
    import torch
    import timm_mobileone  # noqa: F401  (registers the models)
    from safetensors.torch import save_file
    repos = []
    for tag in timm.list_models(module=list(MODULES), pretrained=True, include_tags=True):
        repo = timm.models.get_pretrained_cfg(tag).hf_hub_id
        if not repo or repo in repos:
            continue
        upstream = repo.split('/', 1)[1]  # timm/mobileone_s0.apple_in1k -> the timm model it was made for
        torch.manual_seed(0)
        state = timm.create_model(upstream.split('.')[0]).state_dict()
        folder = cache / f'models--{repo.replace("/", "--")}'
        revision = '0' * 40
        snapshot = folder / 'snapshots' / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / 'model.safetensors'))
        (folder / 'refs').mkdir(exist_ok=True)
        (folder / 'refs' / 'main').write_text(revision)
        repos.append(repo)
    return repos


def run_pass(label: str, test_file: Path, work: Path, env: Dict[str, str], workers: str,
             extra: List[str]) -> Dict[str, Any]:
    folder = work / label
    folder.mkdir()
    shutil.copy(test_file, folder / 'test_models.py')
    (folder / 'conftest.py').write_text(CONFTEST % dict(modules=list(MODULES)))
    (folder / 'pytest.ini').write_text(PYTEST_INI)
    results = folder / 'results.json'
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '--rootdir', str(folder), '-c',
           str(folder / 'pytest.ini'), str(folder / 'test_models.py'), '--durations', '8', *extra]
    if workers != '0':
        cmd += ['-n', workers, '-p', 'xdist']
        # one intra-op thread per worker: N workers x the default threads oversubscribe the cores, and OpenMP's
        # spinning then made single backward passes 100x slower here (40 s instead of 0.4 s)
        env = dict(env, OMP_NUM_THREADS=env.get('OMP_NUM_THREADS', '1'))
    print(f'{label}: {" ".join(cmd[2:])}', file=sys.stderr)
    try:  # pytest's progress straight to our stderr; through a pipe where stderr is no file (a captured one)
        stream = sys.stderr if sys.stderr.fileno() >= 0 else None
    except (AttributeError, OSError, ValueError):
        stream = None
    path = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH', '')]))
    # run from inside a pytest worker (this project's own test of the runner): the worker's variables would make
    # the inner session think it is a worker too
    env = {k: v for k, v in env.items() if not k.startswith(('PYTEST_XDIST', 'PYTEST_CURRENT'))}
    proc = subprocess.run(cmd, cwd=folder, env=dict(env, CONFORMANCE_RESULTS=str(results), PYTHONPATH=path),
                          stdout=stream or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if stream is None:
        sys.stderr.write(proc.stdout)
    if not results.is_file():
        raise UserError(f'{label}: pytest ended without results (exit code {proc.returncode}): see the output above')
    rows = json.loads(results.read_text())
    counts = {k: sum(r['outcome'] == k for r in rows) for k in ('passed', 'failed', 'skipped')}
    out = dict(name=label, **counts, returncode=proc.returncode,
               failures=[r for r in rows if r['outcome'] == 'failed'],
               skips=sorted({r['reason'] for r in rows if r['outcome'] == 'skipped'}))
    print(f'{label}: {counts["passed"]} passed, {counts["failed"]} failed, {counts["skipped"]} skipped',
          file=sys.stderr)
    for r in out['failures']:
        print(f'  FAILED {r["test"]} ({r["when"]}): {r["reason"]}', file=sys.stderr)
    for reason in out['skips']:
        print(f'  skipped: {reason}', file=sys.stderr)
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m tests.timm_conformance', description=__doc__.splitlines()[0])
    p.add_argument('--timm-tests', default='', metavar='PATH',
                   help='a timm source checkout, its tests folder or test_models.py (default: the installed '
                        "version's source distribution, cached)")
    p.add_argument('--cache', default=str(default_cache()), help='where the downloaded test files are kept')
    p.add_argument('-n', '--workers', default='auto', help="pytest-xdist workers ('0': none)")
    p.add_argument('-k', default='', help='pytest -k expression (a subset of the tests)')
    return p.parse_args(argv)


@cli
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run both passes; prints (and returns) the JSON summary, exits 1 if a test failed."""
    import timm
    args = parse_args(argv)
    test_file = timm_tests(timm.__version__, args.timm_tests, Path(args.cache))
    text = test_file.read_text()
    note = None
    with tempfile.TemporaryDirectory(prefix='timm-conformance-') as tmp:
        work = Path(tmp)
        repos = populate_hub_cache(work / 'hub')
        env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(work / 'hub'), HF_HUB_DISABLE_TELEMETRY='1')
        env.pop('GITHUB_ACTIONS', None)  # test_models.py defines its pretrained tests outside GitHub's runners only
        passes = [run_pass('as_released', test_file, work, env, args.workers, ['-k', args.k] if args.k else [])]
        if FEAT_INTER_LINE in text:
            patched = work / 'test_models_feat_inter.py'
            patched.write_text(text.replace(FEAT_INTER_LINE, FEAT_INTER_LINE + ''.join(f'{m!r}, ' for m in MODULES), 1))
            passes.append(run_pass('with_feat_inter', patched, work, env, args.workers,
                                   ['-k', 'intermediates' + (f' and ({args.k})' if args.k else '')]))
        else:
            note = f'{test_file} has no {FEAT_INTER_LINE!r} list: only the first pass ran'
            print(note, file=sys.stderr)
    result = dict(timm=timm.__version__, test_file=str(test_file), models=timm.list_models(module=list(MODULES)),
                  hub_repos=repos, hub_note='the pretrained tests loaded generated files with the names, keys and '
                  'shapes of these repos (random values) from a local Hub cache, offline: the loading path, not the '
                  'weights', passes=passes, note=note, passed=sum(p['passed'] for p in passes),
                  failed=sum(p['failed'] for p in passes), skipped=sum(p['skipped'] for p in passes))
    print(json.dumps(result))
    if result['failed'] or any(p['returncode'] not in (0, 5) for p in passes):  # 5: a pass selected no test
        raise SystemExit(1)
    return result


if __name__ == '__main__':
    main()
