"""How long a core needs to warm up after the timer's pause: batch-1 latency after a 50 ms idle pause and W ms of
warm-up, for several W, against back-to-back calls.

    python benchmarks/timer_warmup.py [--runtime executorch|onnx] [--models mobileone_112_s0,mobilefacenet]
                                      [--rounds 40] [--warm-ms 0,10,20,50]

Why: `profile.time_round_robin` pauses before each timed call so that the previous runtime's spinning thread pool
goes idle, and a core that idled runs slowly for its first milliseconds of work (clock ramp, or the hypervisor
waking the vCPU). This measures that ramp on the machine at hand: each row is `--rounds` rounds, round-robin over
the models, each timed call after the pause and W ms of untimed calls of the same model (at least one); "busy wait"
spins W=30 ms without calling the model; "back to back" has no pause. Every row is timed by
`profile.time_round_robin` itself, with its `pause`, `warm` and `long_call` set per row. Fused models, BN statistics
calibrated on random batches. Prints one JSON object (medians in ms) and a markdown table on stderr.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(name: str, runtime: str, tmp: Path):
    import torch
    from timm_mobileone.deploy.formats import FORMATS, ExportOptions, quiet
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from op_profile import fused_model
    model = fused_model(name)
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    fmt = FORMATS[runtime]
    fmt.require('--runtime')
    path = tmp / f'{name}{fmt.suffix}'
    with quiet():
        fmt.export(model, path, x, ExportOptions())
    run, xn = fmt.runner(str(path)), x.numpy()
    return lambda: run(xn)


def timed(calls, rounds: int, pause: float, warm: float, busy: bool = False):
    """Medians (ms) from the project's own timer: warmed by calls for `warm` seconds (at least one), or with `busy`
    by its busy wait (`long_call=0`: after the first round, every entry counts as a long call)."""
    from timm_mobileone.deploy.profile import time_round_robin
    medians = time_round_robin(calls, rounds, pause=pause, warm=warm, long_call=0.0 if busy else float('inf'))
    return {k: round(v * 1e3, 2) for k, v in medians.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runtime', choices=('executorch', 'onnx'), default='executorch')
    p.add_argument('--models', default='mobileone_112_s0,mobilefacenet')
    p.add_argument('--rounds', type=int, default=40)
    p.add_argument('--warm-ms', default='0,10,20,50')
    args = p.parse_args(argv)
    names = args.models.split(',')
    with tempfile.TemporaryDirectory() as tmp:
        calls = {n: build(n, args.runtime, Path(tmp)) for n in names}
        for call in calls.values():
            for _ in range(20):
                call()
        rows = [dict(setting='one call' if w == 0 else f'calls for {w} ms', **timed(calls, args.rounds, 0.05, w / 1e3))
                for w in (int(v) for v in args.warm_ms.split(','))]
        busy = timed(calls, args.rounds, 0.05, 0.03, busy=True)
        rows.append(dict(setting='30 ms busy wait, no warm-up call', **busy))
        rows.append(dict(setting='back to back, no pause', **timed(calls, args.rounds, 0.0, 0.0)))
    command = 'python benchmarks/timer_warmup.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(dict(runtime=args.runtime, rounds=args.rounds, pause_ms=50, rows=rows, command=command)))
    lines = ['| warm-up after the 50 ms pause | ' + ' | '.join(f'{n} (ms)' for n in names) + ' |',
             '|---|' + '---:|' * len(names)]
    lines += [f"| {r['setting']} | " + ' | '.join(f'{r[n]:.2f}' for n in names) + ' |' for r in rows]
    print('\n'.join(lines), file=sys.stderr)


if __name__ == '__main__':
    main()
