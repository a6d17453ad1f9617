"""Training throughput: images/s and memory per image of each model x train form x eager/compiled, side by side.

    python benchmarks/train_throughput.py                      # CPU or the GPU present, the default grid
    python benchmarks/train_throughput.py --quick              # S0 and MobileFaceNet, a few steps (CPU: ~2 min)
    python benchmarks/train_throughput.py --amp --channels-last -b 256 --compile --data faces/ --out table.md

Two paths:
* **synthetic**: the ceiling. One fixed batch already on the device; a step is train.face's FaceTrainModel
  (backbone + CosFace head over `--num-classes` identities) forward, backward and an SGD step (fused on CUDA).
  Each model's entries are timed round-robin with MobileFaceNet's, by the project's timer
  (`timm_mobileone.deploy.profile.time_round_robin`, median of `--rounds`), then freed before the next model.
* **train.face** (with `--data`, or `--real` on generated crops): the trainer itself on real crops (decode, flip,
  pinned copies, normalisation on the device), its own images/s from `log.jsonl` after the first log interval;
  the entries run one after another, each once per round.

Memory per image: the bytes the forward saves for backward (activations; every device, by
`torch.autograd.graph.saved_tensors_hooks`, storages counted once) and, on CUDA, the peak a step allocates above
the steady state (weights, gradients, optimizer buffers). Ratios: to MobileFaceNet on the same path, compiled
alike (`vs mfn`), and to the same model's branches form (`vs branches`).

Prints progress on stderr, one JSON object on stdout; `--out` also writes the markdown table (after each entry of
the train.face path, so a cut run keeps what it measured).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCE = 'mobilefacenet'
DEFAULT_MODELS = (REFERENCE, 'mobileone_112_s0', 'mobileone_112_s1', 'mobileone_112_s2', 'mobileone_112_s3',
                  'mobileone_112_s4', 'mobileone_112_dbb_s0')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--models', nargs='+', default=None,
                   help=f'models (default: {" ".join(DEFAULT_MODELS)}; --quick: the first two); each is timed with '
                        f'the reference ({REFERENCE}) in a process of its own')
    p.add_argument('--forms', nargs='+', default=['branches', 'merged'], choices=('branches', 'merged'),
                   help='train forms (merged: MobileOne models only)')
    p.add_argument('--compile', action='store_true', help='also time each entry under torch.compile')
    p.add_argument('-b', '--batch-size', type=int, default=None, help='batch size (default: 256 CUDA, 32 CPU)')
    p.add_argument('--steps', type=int, default=None, help='steps per timed call (default: 10 CUDA, 1 CPU)')
    p.add_argument('--rounds', type=int, default=5, help='timed rounds (medians)')
    p.add_argument('--num-classes', type=int, default=10000, help='identities of the CosFace head')
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    p.add_argument('--channels-last', action='store_true', help='channels_last (CUDA)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    p.add_argument('--data', default='', help='train.face --data: also time the trainer on these crops')
    p.add_argument('--real', action='store_true', help='time the trainer on generated crops when no --data')
    p.add_argument('--no-real', dest='real', action='store_false', help=argparse.SUPPRESS)
    p.add_argument('--real-steps', type=int, default=60, help='train.face steps per entry')
    p.add_argument('--workers', type=int, default=min(12, os.cpu_count() or 1), help='train.face --workers')
    p.add_argument('--quick', action='store_true', help='mobilefacenet and S0, 3 rounds')
    p.add_argument('--out', default='', help='also write the markdown table here')
    args = p.parse_args(argv)
    cuda = args.device.startswith('cuda')
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.steps = args.steps or (10 if cuda else 1)
    if args.models is None:
        args.models = list(DEFAULT_MODELS[:2] if args.quick else DEFAULT_MODELS)
    if args.quick:
        args.rounds = min(args.rounds, 3)
        args.real_steps = min(args.real_steps, 12)
    return args


def _entries(args) -> List[Dict[str, Any]]:
    out = []
    for model in args.models:
        forms = [f for f in args.forms if f == 'branches' or _has_merged(model)]
        for compiled in ([False, True] if args.compile else [False]):
            out += [dict(model=model, form=f, compiled=compiled) for f in forms]
    return out


def _has_merged(model: str) -> bool:
    return model.startswith('mobileone_112_s')


def _build(entry, args, device):
    """train.face's FaceTrainModel (backbone + CosFace head), an SGD optimizer and a fixed batch on the device."""
    import timm
    from train.step import FaceTrainModel
    from train.margin import MarginHead
    backbone = timm.create_model(entry['model'], num_classes=0)
    if _has_merged(entry['model']):
        backbone.set_train_form(entry['form'])
    with torch.no_grad():  # the embedding size, probed in eval mode as train.face does (MobileFaceNet: 128)
        embed_dim = backbone.eval()(torch.zeros(1, 3, 112, 112)).shape[-1]
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else None
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net = FaceTrainModel(backbone.train(), MarginHead(embed_dim, args.num_classes, 'cosface'), amp).to(
        device, memory_format=memory_format).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, **(dict(fused=True) if device.type == 'cuda'
                                                                        else {}))
    if entry['compiled']:
        net.compile()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 112, 112, generator=gen).to(device, memory_format=memory_format)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(device)
    return net, opt, x, y


def _step_fn(net, opt, x, y, steps: int, device):
    from timm_mobileone.cli import release_freed_memory

    def run():
        for _ in range(steps):
            loss = net(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        else:  # glibc keeps each step's freed peak: with every entry alive, 11 of them exhausted 24 GB (S3, batch 32)
            release_freed_memory()
    return run


def activation_bytes(net, x, y) -> int:
    """Bytes of the tensors one forward saves for its backward (each storage once)."""
    seen: Dict[Any, int] = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            pass
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net(x, y)
    del loss
    return sum(seen.values())


def cuda_step_peak(run, device) -> int:
    torch.cuda.synchronize(device)
    steady = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    return torch.cuda.max_memory_allocated(device) - steady


def synthetic(args, device, rows: List[Dict[str, Any]], write) -> None:
    """Per model, its entries and the reference's, round-robin, in a process of its own (one process for every
    group grew past 24 GB of host memory at batch 32 on CPU, the freed heap of the earlier groups kept); ratios
    are taken within each group."""
    entries = _entries(args)
    others = [m for m in dict.fromkeys(e['model'] for e in entries) if m != REFERENCE] or [REFERENCE]
    if len(others) == 1:
        rows += _synthetic_group(args, device, others[0], 0)
        return
    argv = sys.argv[1:]
    for group, model in enumerate(others):
        cmd = [sys.executable, __file__, *_without(argv, ('--models', '--out', '--data')), '--no-real', '--models',
               *([REFERENCE] if REFERENCE in args.models else []), model]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(f'{model}: the group failed (exit {done.returncode})', file=sys.stderr)
            continue
        for row in json.loads(done.stdout.strip().splitlines()[-1])['rows']:
            if row['model'] != REFERENCE or group == 0:
                rows.append(dict(row, group=group))
        write()  # after each group: a run cut by a time limit keeps what it measured


def _without(argv: List[str], flags) -> List[str]:
    """argv less the given flags and their values."""
    out, skip = [], False
    for a in argv:
        if a.startswith('-') and not a[1:2].isdigit():  # a flag (not a negative number) ends the last one's values
            skip = a.split('=')[0] in flags
        if not skip:
            out.append(a)
    return out


def _synthetic_group(args, device, model: str, group: int) -> List[Dict[str, Any]]:
    """One model's entries and the reference's, built, warmed up and timed round-robin."""
    from timm_mobileone.deploy.profile import time_round_robin
    entries = _entries(args)
    rows: List[Dict[str, Any]] = []
    members = [e for e in entries if e['model'] in (REFERENCE, model)]
    built, calls = [], {}
    for i, entry in enumerate(members):
        t0 = time.perf_counter()
        net, opt, x, y = _build(entry, args, device)
        run = _step_fn(net, opt, x, y, args.steps, device)
        run()  # warm-up: optimizer state, autotuning, compilation
        row = dict(entry, path='synthetic', group=group, batch_size=args.batch_size,
                   setup_s=round(time.perf_counter() - t0, 1),
                   activation_mb_per_image=round(activation_bytes(net, x, y) / args.batch_size / 2 ** 20, 3))
        if device.type == 'cuda':
            row['step_peak_mb_per_image'] = round(cuda_step_peak(run, device) / args.batch_size / 2 ** 20, 3)
        built.append(row)
        calls[i] = run
        print(f'built {entry} in {row["setup_s"]} s', file=sys.stderr)
    medians = time_round_robin(calls, args.rounds, on_round=lambda k, n: print(
        f'{model}: round {k + 1}/{n}', file=sys.stderr))
    for i, row in enumerate(built):
        row['step_s'] = round(medians[i] / args.steps, 5)
        row['images_per_s'] = round(args.batch_size * args.steps / medians[i], 1)
    # the reference's rows once (from the first group); every group's own reference gives its ratios
    for row in built:
        ref = next((r for r in built if r['model'] == REFERENCE and r['compiled'] == row['compiled']), None)
        row['ref_images_per_s'] = ref['images_per_s'] if ref else None
        if row['model'] != REFERENCE or group == 0:
            rows.append(row)
    return rows


def _real_data(args, folder: Path) -> str:
    if args.data:
        return args.data
    from train.synthetic import identity_images, write_image_folder
    n = max(args.batch_size * 4 // 16, 2)
    return str(write_image_folder(folder / 'faces', identity_images(16, n, seed=0)))


def train_face(args, device, write) -> List[Dict[str, Any]]:
    """train.face on real crops, each entry in turn per round; the trainer's own images/s after warm-up."""
    rows: Dict[int, Dict[str, Any]] = {}
    entries = [e for e in _entries(args)]
    with tempfile.TemporaryDirectory() as tmp:
        data = _real_data(args, Path(tmp))
        for r in range(args.rounds if not args.quick else 1):
            for i, entry in enumerate(entries):
                out = Path(tmp) / f'run{i}_{r}'
                log_every = max(2, args.real_steps // 6)
                cmd = [sys.executable, '-m', 'train.face', '--model', entry['model'], '--data', data, '--loss',
                       'cosface', '--epochs', '1000', '-b', str(args.batch_size), '--no-export', '--output',
                       str(out), '--log-interval', str(log_every), '--workers', str(args.workers), '--device',
                       args.device, '--checkpoint-every', str(10 ** 9), '--warmup-epochs', '0']
                cmd += ['--train-form', entry['form']] if _has_merged(entry['model']) else []
                cmd += ['--compile'] if entry['compiled'] else []
                cmd += ['--amp', '--amp-dtype', 'bfloat16'] if args.amp else []
                cmd += ['--channels-last'] if args.channels_last else []
                rate = _run_steps(cmd, out, args.real_steps)
                row = rows.setdefault(i, dict(entry, path='train.face', batch_size=args.batch_size, rates=[]))
                row['rates'].append(rate)
                print(f'train.face {entry}: {rate} img/s', file=sys.stderr)
                write()
    out_rows = []
    for row in rows.values():
        rates = sorted(x for x in row.pop('rates') if x is not None)
        row['images_per_s'] = rates[len(rates) // 2] if rates else None
        out_rows.append(row)
    return out_rows


def _run_steps(cmd, out: Path, steps: int) -> Optional[float]:
    """Run the trainer until its log has `steps` steps, stop it, and return images/s over the intervals after
    the first (which holds start-up, compilation and the workers' first batches)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parents[1]))
    log = out / 'log.jsonl'
    rows: List[Dict[str, Any]] = []
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if log.is_file():
                rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
                rows = [x for x in rows if 'images_per_second' in x]
                if rows and rows[-1]['step'] >= steps:
                    break
    finally:
        proc.kill()
        _, err = proc.communicate()
    if len(rows) < 2:
        print(f'train.face gave no timing: {(err or "").strip().splitlines()[-1:] or "no output"}',
              file=sys.stderr)
        return None
    rates = [x['images_per_second'] for x in rows[1:]]
    return round(sorted(rates)[len(rates) // 2], 1)


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    def find(path, model, form, compiled):
        return next((r for r in rows if (r['path'], r['model'], r['form'], r['compiled']) ==
                     (path, model, form, compiled) and r.get('images_per_s')), None)
    for r in rows:
        if not r.get('images_per_s'):
            continue
        ref = find(r['path'], REFERENCE, 'branches', r['compiled'])
        ref_rate = r.get('ref_images_per_s') or (ref['images_per_s'] if ref else None)  # same group if timed there
        r['vs_mfn'] = round(r['images_per_s'] / ref_rate, 3) if ref_rate else None
        base = find(r['path'], r['model'], 'branches', r['compiled'])
        r['vs_branches'] = round(r['images_per_s'] / base['images_per_s'], 3) if base else None
        if base and 'activation_mb_per_image' in r and base.get('activation_mb_per_image'):
            r['activation_vs_branches'] = round(r['activation_mb_per_image'] / base['activation_mb_per_image'], 3)


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ['| path | model | form | compiled | images/s | vs mfn | vs branches | activations MB/img | '
             'step peak MB/img |', '|---|---|---|---|---:|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f"| {r['path']} | {r['model']} | {r['form']} | {'yes' if r['compiled'] else 'no'} | "
                     f"{r.get('images_per_s') or '-'} | {r.get('vs_mfn') or '-'} | {r.get('vs_branches') or '-'} | "
                     f"{r.get('activation_mb_per_image', '-')} | {r.get('step_peak_mb_per_image', '-')} |")
    return '\n'.join(lines)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    import timm_mobileone  # noqa: F401  (registers the models)
    device = torch.device(args.device)
    rows: List[Dict[str, Any]] = []

    def write():
        if args.out:
            add_ratios(rows)
            Path(args.out).write_text(table(rows) + '\n')
    t0 = time.perf_counter()
    synthetic(args, device, rows, write)
    write()
    if args.data or args.real:
        real = train_face(args, device, write)
        rows += real
    add_ratios(rows)
    write()
    print(table(rows), file=sys.stderr)
    machine = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{os.cpu_count()} CPU cores'
    result = dict(device=args.device, machine=machine, torch=torch.__version__, batch_size=args.batch_size,
                  amp='bfloat16' if args.amp else None, channels_last=args.channels_last,
                  seconds=round(time.perf_counter() - t0, 1), rows=rows,
                  command='python benchmarks/train_throughput.py ' + ' '.join(sys.argv[1:] if argv is None else argv))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
