"""The plugin stands without the repository: the built wheel, installed into a fresh environment and run from a folder
outside the repository, creates the models, renders and writes model cards where the user runs it, prints the zoo
report and exports. The fresh environment sees this environment's dependencies (torch, timm, ...) through a path
file, not its editable install of timm_mobileone: what runs is the wheel's copy. The commands share one process (see
DRIVER), but for the two-photo comparison, a `python -m` process of its own."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'{cmd} exited {proc.returncode}:\n{proc.stderr[-3000:]}'
    return proc.stdout


@pytest.fixture(scope='module')
def wheel_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp / 'src'  # a copy of what the wheel is built from: the build leaves nothing in the checkout
    src.mkdir()
    for name in ('pyproject.toml', 'README.md', 'LICENSE'):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / 'timm_mobileone', src / 'timm_mobileone',
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    _run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w', str(tmp / 'dist'),
          str(src)], tmp, os.environ)
    wheel = next((tmp / 'dist').glob('timm_mobileone-*.whl'))
    venv = tmp / 'venv'
    # no pip of its own (ensurepip costs seconds): this environment's pip installs into it
    _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], tmp, os.environ)
    python = venv / 'bin' / 'python'
    site = Path(_run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], tmp,
                     os.environ).strip())
    deps = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}
    (site / 'deps.pth').write_text(''.join(p + '\n' for p in sorted(deps)))  # no .pth processing: no editable copy
    _run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '-q', '--no-deps', '--no-index',
          str(wheel)], tmp, os.environ)
    work = tmp / 'work'
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    env.update(HF_HUB_OFFLINE='1', PYTHONDONTWRITEBYTECODE='1')
    return python, site, work, env


# `python -m MODULE ARGV...` for several commands in one process of the installed environment (a Python + torch + timm
# start costs 6-10 s on a 2-core box): runpy runs each module as `-m` does, its file descriptor 1 (C++ writes too) goes
# to a file, and its exit code and that stdout are collected. The faces test below runs a real `python -m` process.
DRIVER = r"""
import json, os, runpy, sys, tempfile
ORT = 'ort' in sys.argv[1:]  # onnxruntime is installed: also the zoo report and an ONNX export


def run(module, *argv):
    sys.argv = [module, *argv]
    with tempfile.TemporaryFile('w+') as f:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            runpy.run_module(module, run_name='__main__', alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return dict(code=code, stdout=f.read())


import timm, torch, timm_mobileone
m = timm.create_model('mobileone_112_s0').eval()
f = timm.utils.reparameterize_model(m)
x = torch.randn(2, 3, 112, 112)
out = dict(facts=dict(file=timm_mobileone.__file__, shape=list(f(x).shape), models=timm.list_models('mobileone_112_*')))
out['card'] = run('timm_mobileone.hub', 'card', '--model', 'mobileone_112_s0', '--tag', 'test')
if ORT:
    out['report'] = run('timm_mobileone', '-m', 'mobileone_112_test', '--repeats', '1', '-b', '2', '--json',
                        '--no-progress')
    out['export'] = run('timm_mobileone.export', '--model', 'mobileone_112_test', '--format', 'onnx', '--out',
                        't.onnx')
print('\n' + json.dumps(out))
"""


@pytest.fixture(scope='module')
def wheel_runs(wheel_env):
    """The models, a model card, the zoo report and an ONNX export from the installed wheel (one process)."""
    import importlib.util
    python, site, work, env = wheel_env
    ort = importlib.util.find_spec('onnxruntime') is not None
    return json.loads(_run([str(python), '-c', DRIVER, *(['ort'] * ort)], work, env).splitlines()[-1])


def test_models_and_card_from_the_installed_wheel(wheel_env, wheel_runs):
    python, site, work, env = wheel_env
    facts = wheel_runs['facts']
    assert Path(facts['file']).is_relative_to(site)  # the wheel's copy, not the checkout
    assert facts['shape'] == [2, 512] and 'mobileone_112_s4' in facts['models']
    assert wheel_runs['card']['code'] == 0
    card = json.loads(wheel_runs['card']['stdout'])  # one JSON object is all of stdout
    written = work / card['card']  # a relative path: from the folder the user runs it in
    assert written.is_file() and written.resolve().is_relative_to(work.resolve())
    assert not any(site.rglob('hub_cards'))  # nothing written into the installed package


def test_zoo_report_and_export_from_the_installed_wheel(wheel_env, wheel_runs):
    pytest.importorskip('onnxruntime')
    python, site, work, env = wheel_env
    assert wheel_runs['report']['code'] == wheel_runs['export']['code'] == 0
    report = json.loads(wheel_runs['report']['stdout'])
    assert [r['model'] for r in report['models']] == ['mobileone_112_test']
    assert report['models'][0]['fused_ort_latency_ms'] > 0
    result = json.loads(wheel_runs['export']['stdout'])
    assert (work / 't.onnx').is_file() and result['min_cosine'] >= 0.99999


def test_the_extras_install_one_opencv():
    """The headless and the GUI OpenCV wheels both install `cv2`, and the later install silently overwrites the
    other's files: every extra names the one insightface ([deploy]) requires."""
    import tomllib
    extras = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['optional-dependencies']
    names = {req.split('>')[0].split('=')[0].split('[')[0].strip() for reqs in extras.values() for req in reqs}
    assert {n for n in names if n.startswith('opencv')} == {'opencv-python'}


def test_two_photos_one_answer_from_the_installed_wheel(wheel_env, tmp_path):
    """What a new user does after `pip install 'timm-mobileone[faces]'`: two photos in, a cosine and an answer out,
    with the YuNet detector the wheel ships (no checkout, no eval/)."""
    from helpers import FACE_PEOPLE, LFW_DEV, face_photo, lfw_crop
    cv2 = pytest.importorskip('cv2')
    pytest.importorskip('skimage')
    if not (LFW_DEV / 'pairs.txt').is_file():
        pytest.skip(f'{LFW_DEV} not found')
    import timm
    import torch
    python, site, work, env = wheel_env
    for n in (1, 2):
        cv2.imwrite(str(work / f'{n}.jpg'), face_photo(lfw_crop(FACE_PEOPLE[0], n), n))
    torch.save(timm.create_model('mobileone_112_test').state_dict(), work / 'weights.pth')  # any weights: not random
    out = json.loads(_run([str(python), '-m', 'timm_mobileone.faces', 'compare', '1.jpg', '2.jpg', '--model',
                           'mobileone_112_test', '--checkpoint', 'weights.pth', '--threshold', '0.2'], work, env))
    assert out['a']['status'] == out['b']['status'] == 'ok' and isinstance(out['same'], bool)
    assert -1 <= out['cosine'] <= 1 and out['threshold'] == 0.2
    assert list(site.rglob('face_detection_yunet_2023mar.onnx')) and list(site.rglob('faces/detectors/LICENSE'))
