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
every failure and skip with its reason); progress on stderr. Exit code 0: nothing failed; 1: a test failed, or the
file gave no test to run (pytest cannot collect it, or it holds no test of this project's models; one `error:` line,
checked by collecting it before anything runs); 2: a usage error (no timm tests to be had).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from timm_mobileone.cli import cli
from timm_mobileone.errors import UserError, first_line

REPO = Path(__file__).resolve().parents[1]
MODULES = ('mobileone_112', 'dbb', 'mobilefacenet')  # the project's model modules, as timm's registry names them
FEAT_INTER_LINE = 'FEAT_INTER_FILTERS = ['

# the conftest of the run folder: registers the project's models before timm's test module lists them, keeps only
# their tests, and records every outcome
CONFTEST = '''
import json, os
import pytest
import timm_mobileone  # noqa: F401  (registers the models before test_models.py lists them at import)
import timm

OURS = set(timm.list_models(module=%(modules)r))
_RESULTS = []
_COLLECTION = dict(errors=[], total=0, ours=0, selected=0)
_list_models = timm.list_models


def _ours_only(*args, **kwargs):
    # test_models.py parametrizes its tests with timm.list_models(...) at import: answering with this project's
    # models alone keeps collection to them (thousands of timm models otherwise), the test functions untouched
    return [n for n in _list_models(*args, **kwargs) if n.split('.')[0] in OURS]


timm.list_models = _ours_only


@pytest.hookimpl(tryfirst=True)  # before -k deselects: what the file holds of ours, then what -k keeps of it
def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        name = str(params.get('model_name', '')).split('.')[0]
        (keep if name in OURS else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
    _COLLECTION.update(total=len(keep) + len(drop), ours=len(keep))


def pytest_collectreport(report):
    if report.failed:
        _COLLECTION['errors'].append(dict(where=report.nodeid, text=str(report.longrepr)))


def pytest_collection_finish(session):
    _COLLECTION['selected'] = len(session.items)  # after -k
    report = os.environ.get('CONFORMANCE_COLLECTION')
    if report:  # the first pass: the runner reads this before it shows any output, and nothing runs on a problem
        with open(report + '.tmp', 'w') as f:  # every xdist worker writes the same counts
            json.dump(_COLLECTION, f)
        os.replace(report + '.tmp', report)
        if _COLLECTION['errors'] or not _COLLECTION['selected']:
            pytest.exit('the file gives no model test to run (the runner says why)', returncode=4)


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


class RunFailed(Exception):
    """The test file was in hand but gave no verdict (nothing to collect, a crash): one `error:` line, exit code 1.
    Not a UserError (exit 2, the command line's fault): a file pytest cannot collect or without a model test can
    come from this project as well (the conftest imports it, test_models.py lists its models at import), and must
    fail CI as a failed test does."""


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


def _run_folder(label: str, test_file: Path, work: Path) -> Path:
    """work/label holding the test file as test_models.py, the conftest and pytest.ini."""
    folder = work / label
    folder.mkdir()
    shutil.copy(test_file, folder / 'test_models.py')
    (folder / 'conftest.py').write_text(CONFTEST % dict(modules=list(MODULES)))
    (folder / 'pytest.ini').write_text(PYTEST_INI)
    return folder


def _pytest(folder: Path) -> List[str]:
    return [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '--rootdir', str(folder), '-c',
            str(folder / 'pytest.ini'), str(folder / 'test_models.py')]


def _inner_env(env: Dict[str, str]) -> Dict[str, str]:
    """`env` for the inner pytest: the repository importable, no variables of an outer pytest worker (this
    project's own test of the runner runs it from inside one, and the inner session would think it is a worker)."""
    path = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH', '')]))
    return {**{k: v for k, v in env.items() if not k.startswith(('PYTEST_XDIST', 'PYTEST_CURRENT'))},
            'PYTHONPATH': path}


_EXCEPTION_LINE = re.compile(r'^E\s+([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)\b.*)$')
_LINE_NO = re.compile(r'test_models\.py(?:", line |:)(\d+)')


def _collect_reason(text: str) -> str:
    """One line out of pytest's report of a collection error: the exception and the test file's line."""
    lines = [line for line in text.splitlines() if line.strip()]
    found = [m.group(1) for m in map(_EXCEPTION_LINE.match, lines) if m]
    reason = found[-1] if found else next((line[1:].strip() for line in reversed(lines) if line.startswith('E ')),
                                          lines[-1].strip() if lines else 'no output')
    at = _LINE_NO.findall(text)
    return (reason + (f' (line {at[-1]})' if at else ''))[:300]


def check_python(test_file: Path) -> None:
    """RunFailed, one line, where `test_file` is not Python: said without the seconds an inner pytest takes to import
    torch, timm and the models."""
    try:
        compile(test_file.read_bytes(), str(test_file), 'exec', dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        line = getattr(e, 'lineno', None)
        why = first_line(Exception(getattr(e, 'msg', None) or str(e)))  # a SyntaxError's without its location
        raise RunFailed(f'{test_file}: pytest cannot collect it: {type(e).__name__}: {why}'
                        + (f' (line {line})' if line else '')) from None


def collection_problem(found: Dict[str, Any], k: str) -> Optional[str]:
    """What keeps a collected file (the conftest's counts: errors, total, ours, selected) from a run, if anything."""
    if found['errors']:
        return f'pytest cannot collect it: {_collect_reason(found["errors"][0]["text"])}'
    if not found['ours']:
        total = found['total']
        return (f'collected no model test ({total} test{"" if total == 1 else "s"}, none parametrized by a model_name '
                f'of this project\'s modules {", ".join(MODULES)}, as timm\'s test_models.py is)')
    if not found['selected']:
        return f'-k {k!r} selects none of its {found["ours"]} model tests'
    return None


def _stderr_fd() -> Optional[int]:
    try:
        fd = sys.stderr.fileno()
        return fd if fd >= 0 else None
    except (AttributeError, OSError, ValueError):  # a captured stderr
        return None


def run_pass(label: str, test_file: Path, work: Path, env: Dict[str, str], workers: str, extra: List[str],
             check_k: Optional[str] = None) -> Dict[str, Any]:
    """One pytest run of `test_file`; with `check_k` (the -k expression, '' for none) it is also the collection
    check: the inner conftest writes its collection counts before any test runs and stops there on a problem, and
    the run's output is held until the counts are read, so that a file with no model test to run fails with one
    `error:` line (RunFailed) and nothing else (one pytest start, not a --collect-only run before the pass)."""
    folder = _run_folder(label, test_file, work)
    results = folder / 'results.json'
    cmd = _pytest(folder) + ['--durations', '8', *extra]
    if workers != '0':
        cmd += ['-n', workers, '-p', 'xdist']
        # one intra-op thread per worker: N workers x the default threads oversubscribe the cores, and OpenMP's
        # spinning then made single backward passes 100x slower here (40 s instead of 0.4 s)
        env = dict(env, OMP_NUM_THREADS=env.get('OMP_NUM_THREADS', '1'))
    env = dict(_inner_env(env), CONFORMANCE_RESULTS=str(results))
    report = folder / 'collection.json'
    if check_k is not None:
        env['CONFORMANCE_COLLECTION'] = str(report)
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fd, found = _stderr_fd(), None  # found: the collection counts, once the inner conftest has written them

    def show(data: bytes) -> None:  # pytest's progress as it comes, to our stderr (its fd where it has one)
        if fd is not None:
            sys.stderr.flush()
            os.write(fd, data)
        else:
            sys.stderr.write(data.decode(errors='replace'))
            sys.stderr.flush()

    def counts_fine() -> bool:  # the held output may be shown: no check asked, or the counts are in and fine
        nonlocal found
        if check_k is None:
            return True
        if found is None and report.is_file():
            found = json.loads(report.read_text())
        return found is not None and not collection_problem(found, check_k)

    held = [f'{label}: {" ".join(cmd[2:])}\n'.encode()]  # the header too: a problem is all stderr holds
    with proc:
        while True:
            data = os.read(proc.stdout.fileno(), 1 << 16)
            if held is None:
                show(data)
            else:
                held.append(data)
                if counts_fine():
                    show(b''.join(held))
                    held = None
            if not data:
                break
    problem = found and collection_problem(found, check_k)
    if problem:
        raise RunFailed(f'{test_file}: {problem}')
    if held is not None:  # pytest stopped before its collection ended: the conftest or a plugin failed to load
        text = b''.join(held[1:]).decode(errors='replace')
        raise RunFailed(f'{test_file}: pytest cannot collect it (exit code {proc.returncode}): '
                        f'{_collect_reason(text)}')
    if not results.is_file():  # it collected: pytest crashed or was killed
        raise RunFailed(f'{label}: pytest ended without results (exit code {proc.returncode}): see the output above')
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
    """Run both passes; prints (and returns) the JSON summary, exits 1 if a test failed or none could run."""
    try:
        return _main(argv)
    except RunFailed as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(1) from None


def _main(argv: Optional[List[str]]) -> Dict[str, Any]:
    import timm
    args = parse_args(argv)
    test_file = timm_tests(timm.__version__, args.timm_tests, Path(args.cache))
    text = test_file.read_text(encoding='utf-8', errors='replace')
    note = None
    with tempfile.TemporaryDirectory(prefix='timm-conformance-') as tmp:
        work = Path(tmp)
        env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(work / 'hub'), HF_HUB_DISABLE_TELEMETRY='1')
        env.pop('GITHUB_ACTIONS', None)  # test_models.py defines its pretrained tests outside GitHub's runners only
        check_python(test_file)
        repos = populate_hub_cache(work / 'hub')
        passes = [run_pass('as_released', test_file, work, env, args.workers, ['-k', args.k] if args.k else [],
                           check_k=args.k)]
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
