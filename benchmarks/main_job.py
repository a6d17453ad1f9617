"""The README's first command, timed: wall time and peak RSS (VmHWM) of `python -m timm_mobileone [ARGS]`.

    python benchmarks/main_job.py [-- ARGS...]        # default: the default run; e.g. -- --full

Each command runs in its own process (peak RSS is its own, read from the kernel's child accounting). The import
baseline (`import torch, timm, timm_mobileone` and nothing else) is measured the same way, so the job's own
working set is the difference: torch's CUDA build alone keeps about 0.7 GB resident on import. Targets for the
default run on a 2-core machine: <= 2 minutes, <= 2 GB. Prints one JSON object.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(argv):
    """(wall seconds, peak RSS MB, exit code) of one child process (its own peak RSS, from wait4)."""
    with tempfile.TemporaryFile('w+') as err:  # a file, not a pipe: a chatty child cannot block on it
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        if code:
            err.seek(0)
            print(err.read()[-2000:], file=sys.stderr)
    return seconds, usage.ru_maxrss / 1024, code


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ['--']:
        args = args[1:]
    base_s, base_mb, _ = measure([sys.executable, '-c', 'import torch, timm, timm_mobileone'])
    seconds, peak_mb, code = measure([sys.executable, '-m', 'timm_mobileone'] + args)
    result = dict(command='python -m timm_mobileone ' + ' '.join(args), exit_code=code,
                  wall_seconds=round(seconds, 1), peak_rss_mb=round(peak_mb), import_only_rss_mb=round(base_mb),
                  import_only_seconds=round(base_s, 1), job_rss_mb=round(peak_mb - base_mb),
                  targets=dict(wall_seconds=120, peak_rss_mb=2048))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
