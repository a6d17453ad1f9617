"""Hostile-input soak: the readers' properties (benchmarks/fuzz_targets.py) for minutes, and the CLIs end to end.

    python benchmarks/fuzz_soak.py --minutes 30 [--cli-share 0.5] [--only TARGET,...] [--out DIR]

Function level: each reader runs in its own worker process, fed Hypothesis examples (broken versions of valid
files) for its slice of the time. Each example is classified: accepted (a valid file), refused (the reader's own
error, one line), traceback (any other exception), timeout (over --timeout s, by SIGALRM) or crash (the worker
died, e.g. a segmentation fault). The worker writes each input to DIR/NAME.last before reading it, and every failing
input to DIR/failures/, so anything found can be replayed.

End to end: the CLIs run in subprocesses on broken inputs (`eval.lfw --data` a pack or a pairs folder, `eval.lfw
--checkpoint`, `eval.verify --embeddings`, `eval.ijb` meta files and `--features`, `hub export --checkpoint`,
`train.face --data` a RecordIO pack). A run is refused when it exits 2 with one `error:` line and no traceback;
every other non-zero exit is a failure, as is an output file left behind by a failed run.

Prints one JSON object (per format: tried, accepted, refused, tracebacks, timeouts, crashes, partial outputs,
peak RSS in MB of the worker or of the largest CLI process) and writes DIR/soak.md, the table of docs/hostile_input.md.
"""
import argparse
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _peak_mb(who=resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)


COUNT_KEYS = ('tried', 'accepted', 'refused', 'tracebacks', 'timeouts', 'crashes', 'partial_outputs')


def _slug(name: str) -> str:
    return name.replace(' ', '_').replace('/', '_')


def _counts(out: Path, name: str):
    """(counts file, the counts so far: a worker restarted after a crash goes on counting), failures folder."""
    counts_file = out / f'{_slug(name)}.json'
    counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}
    for key in COUNT_KEYS:
        counts.setdefault(key, 0)
    failures = out / 'failures'
    failures.mkdir(parents=True, exist_ok=True)
    return counts_file, counts, failures


# ----------------------------------------------------------------------------------------------------------------
# function-level worker


def _worker(name: str, seconds: float, out: Path, timeout: int) -> None:
    """Run target `name`'s property until `seconds` pass; counts go to out/NAME.json after every batch."""
    from hypothesis import HealthCheck, given, settings
    import fuzz_targets as F
    target = F.TARGETS[name]
    strategy = target.strategy()
    counts_file, counts, failures = _counts(out, name)
    last = out / f'{name}.last'
    deadline = time.monotonic() + seconds
    signal.signal(signal.SIGALRM, _alarm)

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(example):
        if time.monotonic() > deadline:
            return
        last.write_bytes(pickle.dumps(example))
        with tempfile.TemporaryDirectory() as d:
            counts['tried'] += 1
            signal.alarm(timeout)
            try:
                counts[F.outcome(target, Path(d), example)] += 1
            except _Timeout:
                counts['timeouts'] += 1
                (failures / f'{name}-timeout-{counts["tried"]}.pkl').write_bytes(pickle.dumps(example))
            except BaseException:  # noqa: B902 (the soak counts whatever escapes)
                counts['tracebacks'] += 1
                stem = failures / f'{name}-traceback-{counts["tried"]}'
                stem.with_suffix('.pkl').write_bytes(pickle.dumps(example))
                stem.with_suffix('.txt').write_text(traceback.format_exc())
            finally:
                signal.alarm(0)
            if counts['tried'] % 10 == 0:  # a worker killed by a crash loses at most 10 examples' counts
                counts_file.write_text(json.dumps(counts))

    while time.monotonic() < deadline:
        prop()
        counts['peak_rss_mb'] = max(counts.get('peak_rss_mb', 0), _peak_mb())
        counts_file.write_text(json.dumps(counts))


# ----------------------------------------------------------------------------------------------------------------
# CLI cases: (target whose examples feed it, a function example, folder -> (argv, outputs that must not survive))


def _valid_pack(folder: Path) -> Path:
    import fuzz_targets as F
    path = folder / 'valid.bin'
    path.write_bytes(F.pack_bytes(5, 'array', 4, F.tiny_jpeg()))
    return path


def _s0_checkpoint() -> bytes:
    cache = Path(tempfile.gettempdir()) / 'fuzz_soak_s0.safetensors'
    if not cache.exists():
        import timm
        import torch
        from safetensors.torch import save_file
        import timm_mobileone  # noqa: F401
        torch.manual_seed(0)
        model = timm.create_model('mobileone_112_s0')
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
    return cache.read_bytes()


def _file(folder: Path, name: str, data: bytes) -> str:
    (folder / name).write_bytes(data)
    return str(folder / name)


def _cli_lfw_pack(example, folder):
    return ['-m', 'eval.lfw', '--data', _file(folder, 'lfw.bin', example), '-j', '0', '--results-file', str(folder / 'r.json')], \
        [folder / 'r.json']


def _cli_lfw_pairs(example, folder):
    for person in ('Alice', 'Bob'):
        (folder / person).mkdir(exist_ok=True)
        for n in (1, 2):
            import fuzz_targets as F
            (folder / person / f'{person}_{n:04d}.jpg').write_bytes(F.tiny_jpeg(n))
    (folder / 'pairs.txt').write_bytes(example)
    return ['-m', 'eval.lfw', '--data', str(folder), '-j', '0', '--results-file', str(folder / 'r.json')], \
        [folder / 'r.json']


def _cli_lfw_checkpoint(example, folder):
    return ['-m', 'eval.lfw', '--checkpoint', _file(folder, 'ck.safetensors', example), '--data', str(_valid_pack(folder)), '-j', '0',
            '--results-file', str(folder / 'r.json')], [folder / 'r.json']


def _cli_export_mxnet(example, folder):
    return ['-m', 'timm_mobileone.export', '--model', 'mobilefacenet', '--checkpoint',
            _file(folder, 'model-0000.params', example), '--out', str(folder / 'm.onnx')], [folder / 'm.onnx']


def _cli_hub_export(example, folder):
    return ['-m', 'timm_mobileone.hub', 'export', '--model', 'mobileone_112_s0', '--checkpoint',
            _file(folder, 'ck.safetensors', example),
            '--tag', 'fuzz', '--out', str(folder / 'export')], [folder / 'export' / 'model.safetensors']


def _cli_verify_embeddings(example, folder):
    return ['-m', 'eval.verify', '--embeddings', _file(folder, 'e.npy', example), '--data', str(_valid_pack(folder)), '--num-folds', '2',
            '--results-file', str(folder / 'r.json')], [folder / 'r.json']


def _cli_ijb_meta(example, folder):
    import numpy as np
    meta = folder / 'IJBC' / 'meta'
    meta.mkdir(parents=True)
    for name, data in example.items():
        if data is not None:
            (meta / name).write_bytes(data)
    np.save(folder / 'f.npy', np.random.default_rng(0).standard_normal((4, 2, 8)).astype(np.float32))
    return ['-m', 'eval.ijb', '--data-dir', str(folder), '--features', str(folder / 'f.npy'),
            '--results-file', str(folder / 'r.json')], [folder / 'r.json']


def _cli_ijb_features(example, folder):
    import fuzz_targets as F
    meta = folder / 'IJBC' / 'meta'
    meta.mkdir(parents=True)
    for name, lines in F.IJB_VALID.items():
        (meta / name).write_text('\n'.join(lines) + '\n')
    (folder / 'f.npy').write_bytes(example)
    return ['-m', 'eval.ijb', '--data-dir', str(folder), '--features', str(folder / 'f.npy'), '--no-flip',
            '--results-file', str(folder / 'r.json')], [folder / 'r.json']


def _cli_train_face(example, folder):
    data = folder / 'pack'
    data.mkdir()
    for name, content in example.items():
        if content is not None:
            (data / name).write_bytes(content)
    return ['-m', 'train.face', '--data', str(data), '--output', str(folder / 'run'), '--epochs', '1', '-b', '2',
            '-j', '0', '--no-export'], []


def _checkpoint_examples():
    from hypothesis import strategies as st
    import fuzz_targets as F
    return st.just(_s0_checkpoint()).flatmap(lambda d: F.mutated(d, 3))


CLI_CASES = {
    'cli eval.lfw --data PACK': ('bin_pack', None, _cli_lfw_pack),
    'cli eval.lfw --data FOLDER': ('pairs_txt', None, _cli_lfw_pairs),
    'cli eval.lfw --checkpoint': (None, _checkpoint_examples, _cli_lfw_checkpoint),
    'cli hub export --checkpoint': (None, _checkpoint_examples, _cli_hub_export),
    'cli eval.verify --embeddings': ('npy', None, _cli_verify_embeddings),
    'cli eval.ijb meta': ('ijb_meta', None, _cli_ijb_meta),
    'cli eval.ijb --features': ('npy', None, _cli_ijb_features),
    'cli train.face --data RECORDIO': ('recordio', None, _cli_train_face),
    'cli export --checkpoint MXNET': ('mxnet_params', None, _cli_export_mxnet),
}


def _cli_worker(name: str, seconds: float, out: Path, timeout: int) -> None:
    from hypothesis import HealthCheck, given, settings
    import fuzz_targets as F
    target_name, make_strategy, build = CLI_CASES[name]
    strategy = F.TARGETS[target_name].strategy() if target_name else make_strategy()
    slug = _slug(name)
    counts_file, counts, failures = _counts(out, name)
    deadline = time.monotonic() + seconds
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO))

    @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(example):
        if time.monotonic() > deadline:
            return
        with tempfile.TemporaryDirectory() as d:
            argv, outputs = build(example, Path(d))
            counts['tried'] += 1
            try:
                proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                                      timeout=timeout, env=env)
            except subprocess.TimeoutExpired:
                counts['timeouts'] += 1
                (failures / f'{slug}-timeout-{counts["tried"]}.pkl').write_bytes(pickle.dumps(example))
                return
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            clean = proc.returncode == 2 and 'Traceback' not in proc.stderr and lines and \
                (lines[-1].startswith('error: ') or ': error: ' in lines[-1])
            left = [str(p) for p in outputs if p.exists()]
            if proc.returncode == 0:
                counts['accepted'] += 1
            elif clean:
                counts['refused'] += 1
            else:
                counts['crashes' if proc.returncode < 0 else 'tracebacks'] += 1
                stem = failures / f'{slug}-rc{proc.returncode}-{counts["tried"]}'
                stem.with_suffix('.pkl').write_bytes(pickle.dumps(example))
                stem.with_suffix('.txt').write_text(' '.join(argv) + '\n' + proc.stderr[-5000:])
            if proc.returncode != 0 and left:
                counts['partial_outputs'] += 1
                (failures / f'{slug}-partial-{counts["tried"]}.txt').write_text(' '.join(argv) + '\n' + str(left))

    while time.monotonic() < deadline:
        prop()
        counts['peak_rss_mb'] = max(counts.get('peak_rss_mb', 0), _peak_mb(resource.RUSAGE_CHILDREN))
        counts_file.write_text(json.dumps(counts))


# ----------------------------------------------------------------------------------------------------------------
# driver


def _run_slice(kind: str, name: str, seconds: float, out: Path, timeout: int) -> None:
    """One worker process for `seconds`; a worker that dies (a crash in C code) is counted and restarted."""
    end = time.monotonic() + seconds
    slug = _slug(name)
    while time.monotonic() < end - 1:
        proc = subprocess.run([sys.executable, __file__, '--worker', kind, name, '--seconds',
                               str(round(end - time.monotonic(), 1)), '--out', str(out), '--timeout', str(timeout)],
                              cwd=REPO, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        counts_file = out / f'{slug}.json'
        counts = json.loads(counts_file.read_text()) if counts_file.exists() else {'tried': 0}
        counts['crashes'] = counts.get('crashes', 0) + 1
        counts_file.write_text(json.dumps(counts))
        failures = out / 'failures'
        failures.mkdir(parents=True, exist_ok=True)
        last = out / f'{name}.last'
        if last.exists():
            (failures / f'{slug}-crash-rc{proc.returncode}-{counts["crashes"]}.pkl').write_bytes(last.read_bytes())
        (failures / f'{slug}-crash-rc{proc.returncode}-{counts["crashes"]}.txt').write_text(proc.stderr[-5000:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--minutes', type=float, default=30.0)
    parser.add_argument('--cli-share', type=float, default=0.5, help='share of the time for the CLI runs')
    parser.add_argument('--slice', type=float, default=120.0, help='seconds per worker turn (round-robin)')
    parser.add_argument('--timeout', type=int, default=120, help='seconds before an input counts as a hang')
    parser.add_argument('--out', default='', help='folder for counts and failing inputs (default: a temp folder)')
    parser.add_argument('--only', default='', help='comma-separated targets and CLI cases to soak (default: all), '
                                                   'e.g. photo_modes,align_paths,cfp_protocol')
    parser.add_argument('--worker', nargs=2, metavar=('KIND', 'NAME'), help=argparse.SUPPRESS)
    parser.add_argument('--seconds', type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix='fuzz-soak-'))
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        kind, name = args.worker
        (_worker if kind == 'function' else _cli_worker)(name, args.seconds, out,
                                                          args.timeout if kind == 'cli' else min(args.timeout, 30))
        return None
    import fuzz_targets as F
    jobs = [('function', n) for n in F.TARGETS] + [('cli', n) for n in CLI_CASES]
    if args.only:
        only = [n.strip() for n in args.only.split(',') if n.strip()]
        unknown = [n for n in only if n not in F.TARGETS and n not in CLI_CASES]
        if unknown:
            parser.error(f'--only {",".join(unknown)}: no such target (targets: {", ".join(F.TARGETS)}; CLI cases: '
                         f'{", ".join(CLI_CASES)})')
        jobs = [job for job in jobs if job[1] in only]
    budget = {'function': args.minutes * 60 * (1 - args.cli_share), 'cli': args.minutes * 60 * args.cli_share}
    if not any(k == 'cli' for k, _ in jobs) or not any(k == 'function' for k, _ in jobs):  # one kind: all the time
        budget = {kind: args.minutes * 60 for kind in budget}
    per_job = {kind: budget[kind] / max(1, sum(1 for k, _ in jobs if k == kind)) for kind in budget}
    left = {job: per_job[job[0]] for job in jobs}
    t0 = time.monotonic()
    while any(v > 1 for v in left.values()):  # round-robin turns, so a machine hiccup spreads over all formats
        for job in jobs:
            turn = min(args.slice, left[job])
            if turn > 1:
                print(f'[{(time.monotonic() - t0) / 60:5.1f} min] {job[1]}: {turn:.0f} s', file=sys.stderr)
                _run_slice(*job, turn, out, args.timeout)
                left[job] -= turn
    rows = {}
    for kind, name in jobs:
        f = out / f'{_slug(name)}.json'
        rows[name] = json.loads(f.read_text()) if f.exists() else {}
    keys = ('tried', 'accepted', 'refused', 'tracebacks', 'timeouts', 'crashes', 'partial_outputs', 'peak_rss_mb')
    table = ['| format | ' + ' | '.join(k.replace('_', ' ') for k in keys) + ' |', '|---' + '|---:' * len(keys) + '|']
    for name, c in rows.items():
        table.append(f'| {name} | ' + ' | '.join(str(c.get(k, 0)) for k in keys) + ' |')
    (out / 'soak.md').write_text('\n'.join(table) + '\n')
    failed = sum(c.get(k, 0) for c in rows.values() for k in ('tracebacks', 'timeouts', 'crashes', 'partial_outputs'))
    result = dict(minutes=round((time.monotonic() - t0) / 60, 1), out=str(out), failures=failed, formats=rows,
                  command='python benchmarks/fuzz_soak.py ' + ' '.join(sys.argv[1:] if argv is None else argv))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
