"""`python -m timm_mobileone`: the zoo report."""
import json
import re

import pytest
import timm

from timm_mobileone.__main__ import main
from timm_mobileone.deploy.profile import count_macs, count_params

from helpers import run_main


def test_report_sizes_json(capsys):
    result = main(['--json', '--sizes-only', '-m', 'mobileone_112_s0', '-m', 'mobileone_112_s1'])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))
    rows = {r['model']: r for r in printed['models']}
    assert set(rows) == {'mobileone_112_s0', 'mobileone_112_s1'}
    s0 = rows['mobileone_112_s0']
    assert s0['params_m'] == pytest.approx(count_params(timm.create_model('mobileone_112_s0')) / 1e6)
    # S0 trains with 4 conv branches: fusion removes most of its parameters and MACs
    assert s0['fused_params_m'] < s0['params_m'] / 2 and s0['fused_gmacs'] < s0['gmacs'] / 2
    assert 0.2 < s0['fused_gmacs'] < 0.3
    assert printed['versions']['timm'] == timm.__version__


def test_report_timing_and_fusion_error(capsys):
    """The timed report's machinery (calibration, float64 fusion check, ONNX export, round-robin timing, a peer row)
    on the tiny `mobileone_112_test`: what is under test is the machinery, not S0's figures."""
    pytest.importorskip('onnxruntime')
    result = main(['--json', '-m', 'mobileone_112_test', '--peer', 'mobilefacenet', '--repeats', '2',
                   '--batch-size', '4', '--train-batch'])
    # not a terminal: progress as one line per step, so a log shows where the run is
    err = capsys.readouterr().err
    assert re.search(r'zoo: \[1/8\] +\d+ s  mobileone_112_test: fused ONNX export', err)
    assert 'timing batch 1, round 1/2' in err and 'timing batch 4, mobilefacenet, round 1/3' in err
    rows = {r['model']: r for r in result['models']}
    tiny = rows['mobileone_112_test']
    assert tiny['fusion_rel_err_f64'] <= 1e-8
    for form in ('train_eager', 'fused_eager', 'fused_ort'):
        assert tiny[f'{form}_latency_ms'] > 0 and tiny[f'{form}_per_image_ms'] > 0
    assert rows['mobilefacenet']['kind'] == 'peer' and rows['mobilefacenet']['fused_ort_latency_ms'] > 0


def test_mobilefacenet_reference_matches_the_paper():
    model = timm.create_model('mobilefacenet').eval()  # insightface's layout is the paper's
    assert count_params(model) == pytest.approx(0.99e6, rel=0.02)  # the paper's 0.99M (PReLU slopes included)
    assert count_macs(model, (3, 112, 112)) == pytest.approx(0.221e9, rel=0.02)
    assert any(isinstance(m, __import__('torch').nn.PReLU) for m in model.modules())
    assert model(__import__('torch').zeros(2, 3, 112, 112)).shape == (2, 128)


def test_count_macs_depthwise():
    import torch.nn as nn
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_macs(conv, (8, 10, 10)) == 8 * 9 * 10 * 10


def test_report_table_and_bad_model():
    """What the command prints and returns, run in this process (`python -m timm_mobileone` as a process: the installed
    wheel's test, tests/test_wheel.py)."""
    ok = run_main('timm_mobileone.__main__', '--sizes-only', '-m', 'mobileone_112_s0')
    assert ok.returncode == 0
    assert ok.stdout.startswith('| model |') and '| mobileone_112_s0 |' in ok.stdout
    bad = run_main('timm_mobileone.__main__', '-m', 'resnet50')
    assert bad.returncode == 2
    assert bad.stderr.strip().count('\n') == 0 and 'unknown model' in bad.stderr and 'Traceback' not in bad.stderr


def test_deploy_table_shows_gmacs_per_second_beside_latency():
    from timm_mobileone.deploy.runtimes import table
    medians = {('a', 'eager'): 0.004, ('a', 'ncnn_fp32'): 0.002, ('b', 'eager'): 0.010}
    md = table(['a', 'b'], medians, runtimes=('eager', 'ncnn_fp32'), gmacs={'a': 0.262, 'b': 1.0})
    lines = md.splitlines()
    assert lines[0].startswith('| model | GMACs | PyTorch eager ms (GMAC/s) | ncnn FP32 ms (GMAC/s) |')
    assert lines[2] == '| a | 0.262 | 4.00 (66) | 2.00 (131) | ncnn FP32 | 0.50x |'
    assert lines[3] == '| b | 1.000 | 10.00 (100) |  | PyTorch eager | 1.00x |'


def test_round_robin_warms_each_entry_for_a_while_before_timing_it():
    """After the pause, an entry runs untimed for `warm` seconds (a core that idled runs slowly for its first
    10-20 ms); an entry slower than `long_call` gets a busy wait instead of a second call."""
    import time
    from timm_mobileone.deploy.profile import time_round_robin
    starts = {'short': [], 'long': []}

    def make(key, seconds):
        def call():
            starts[key].append(time.perf_counter())
            while time.perf_counter() - starts[key][-1] < seconds:
                pass
        return call
    medians = time_round_robin({'short': make('short', 0.001), 'long': make('long', 0.03)}, repeats=2, pause=0.0,
                               warm=0.02, long_call=0.01)
    # each round: untimed 1 ms calls for >= 0.02 s, then the timed one (counts and upper bounds are not asserted:
    # on a loaded machine a 1 ms call takes longer, so fewer fit)
    assert len(starts['short']) >= 2 * 2
    assert starts['short'][-1] - starts['short'][0] >= 2 * 0.02
    assert len(starts['long']) == 3  # round 1: one untimed + the timed call; round 2: busy wait + the timed call
    assert starts['long'][2] - starts['long'][1] >= 0.03 + 0.02
    assert medians['short'] >= 0.001 and medians['long'] >= 0.03  # lower bounds only: a loaded machine is slower
