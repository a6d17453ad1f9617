"""python -m train.face: a real (tiny) run on generated RecordIO and ImageFolder data, resume after a crash,
torchrun on gloo, and the bad-input contract (one line, exit code 2)."""
import json
import math
import multiprocessing
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train import face, loop
from train.distributed import World
from train.synthetic import identity_images, make_pack, write_image_folder, write_rec_pack
from helpers import face_error, forkserver, interrupt_then_resume

REPO = Path(__file__).resolve().parents[1]
# the loop, not the model, is under test here: the tiny registered variant (tests/test_merged.py, test_reparam.py
# and test_models.py hold S0-S4 to their contracts)
TINY = ['--model', 'mobileone_112_test']
# ArcFace s=64 m=0.5 on 8 identities x 16 images: 3 epochs of batch 16 = 24 steps (batch 8 is too noisy for the
# BatchNorms to show a falling loss that soon); validation every epoch
RUN_FLAGS = [*TINY, '--epochs', '3', '-b', '16', '--lr', '0.01', '--warmup-epochs', '0.25', '--log-interval', '1',
             '--seed', '3']
# resume: 16 identities x 4 images, 2 epochs of batch 8; EMA, drop path and partial-FC sampling all draw on (or
# carry) state that a checkpoint must restore
RESUME_FLAGS = [*TINY, '--epochs', '2', '-b', '8', '--lr', '0.01', '--log-interval', '1', '--checkpoint-every', '4',
                '--model-ema', '--model-ema-decay', '0.9', '--drop-path', '0.05', '--sample-rate', '0.75',
                '--seed', '3']


@pytest.fixture(scope='module')
def samples():
    return identity_images(identities=8, per_identity=8, seed=0)


@pytest.fixture(scope='module')
def rec_pack(tmp_path_factory):
    return write_rec_pack(tmp_path_factory.mktemp('rec') / 'faces', identity_images(8, 16, seed=0))


@pytest.fixture(scope='module')
def val_pack(tmp_path_factory):
    return make_pack(tmp_path_factory.mktemp('val') / 'tiny_val.bin', num_pairs=20)


def _rows(out: Path):
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def run_a(tmp_path_factory, rec_pack, val_pack):
    """An uninterrupted 24-step run with validation and export (in process, decoding in the main process)."""
    out = tmp_path_factory.mktemp('run') / 'a'
    summary = face.main(['--data', str(rec_pack), '--output', str(out), '--val', str(val_pack), '-j', '0',
                         '--tag', 'synthetic_arcface', *RUN_FLAGS])
    return out, summary


def test_loss_falls_and_schedules_follow_the_recipe(run_a):
    out, summary = run_a
    assert summary['steps'] == summary['total_steps'] == 24 and summary['num_classes'] == 8
    rows = [r for r in _rows(out) if 'loss' in r]
    assert [r['step'] for r in rows] == list(range(1, 25))
    losses = np.array([r['loss'] for r in rows])
    assert np.isfinite(losses).all()
    # measured (one thread, seeds 1-3): the last 8 average 0.35-0.42, the first 8 27-31
    assert losses[-8:].mean() < 0.5 * losses[:8].mean(), losses.round(1)
    # weight decay: cosine from 1e-4 to 1e-5 over the run; row k reports the value used by update k (index k-1)
    for r in rows:
        expected = 1e-5 + 0.5 * (1e-4 - 1e-5) * (1 + math.cos(math.pi * (r['step'] - 1) / 24))
        assert r['weight_decay'] == pytest.approx(expected, rel=1e-9)
    assert rows[0]['weight_decay'] == pytest.approx(1e-4) and rows[-1]['weight_decay'] < 1.04e-5
    # lr: linear warmup over a quarter epoch (2 steps) to the peak, then cosine down towards 0
    lrs = [r['lr'] for r in rows]
    assert lrs[:3] == pytest.approx([0.0, 0.005, 0.01])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] < 0.001
    val = [r for r in _rows(out) if 'val' in r]
    assert [r['step'] for r in val] == [8, 16, 24] and all('tiny_val' in r['val'] for r in val)


def test_best_checkpoint_and_export_load_in_both_forms(run_a):
    import timm
    import timm_mobileone  # noqa: F401
    from safetensors.torch import load_file
    out, summary = run_a
    best = json.loads((out / 'best.json').read_text())
    assert best['step'] == summary['best']['step'] and best['results'][0]['dataset'] == 'tiny_val'
    assert best['command'].startswith('python -m eval.verify') and str(out / 'best.safetensors') in best['command']
    # the recorded command reproduces the validation result from the saved weights
    from eval import verify
    again = verify.main(shlex.split(best['command'])[3:])
    assert again['results'][0]['accuracies'] == best['results'][0]['accuracies']
    assert again['results'][0]['thresholds'] == best['results'][0]['thresholds']
    hub = out / 'hub'
    assert sorted(p.name for p in hub.iterdir()) == ['README.md', 'config.json', 'model.safetensors',
                                                      'model_fused.safetensors']
    assert summary['export']['tag'] == 'synthetic_arcface' and summary['export']['results'] == 1
    card = (hub / 'README.md').read_text()
    assert 'tiny_val' in card and 'python -m train.face' in card
    ref = timm.create_model('mobileone_112_test')
    ref.load_state_dict(load_file(str(out / 'best.safetensors')))
    x = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref.eval()(x)
        train_time = timm.create_model(f'local-dir:{hub}', pretrained=True).eval()(x)
        fused = timm.create_model(f'local-dir:{hub}', pretrained=True, inference_mode=True).eval()(x)
    assert torch.equal(train_time, expected)
    assert ((fused - expected).abs().max() / expected.abs().max()).item() < 1e-4


@pytest.fixture(scope='module')
def resume_pack(tmp_path_factory):
    return write_rec_pack(tmp_path_factory.mktemp('rec16') / 'faces', identity_images(16, 4, seed=1))


def _forked(log: Path, target, *args):
    """`target(*args)` in a process forked from a forkserver (started, not joined): a process to SIGKILL without a
    Python + torch start. It computes on one intra-op thread, as torchrun's workers do (OMP_NUM_THREADS=1). Its
    stdout and stderr go to `log` (the server's own are those of whichever test started it)."""
    proc = forkserver('train.face').Process(target=_one_thread, args=(str(log), target, *args))
    proc.start()
    return proc


def _tail(log: Path) -> str:
    return log.read_text(errors='replace')[-3000:] if log.is_file() else f'{log}: not written'


def _one_thread(log: str, target, *args):
    with open(log, 'w') as f:  # C++ writes too
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    torch.set_num_threads(1)
    # the platform's default start method, as `python -m train.face` has: a process started by a forkserver takes
    # 'forkserver' as its own, and its DataLoader workers then came from a second forkserver, which they kept alive
    # (with themselves: their parent never died) after the run was SIGKILLed
    multiprocessing.set_start_method(None, force=True)
    target(*args)


@pytest.fixture
def one_thread():
    """This process on one intra-op thread for the test: what a forked run computes with (float sums over another
    thread count round differently, and resumed losses would then differ from the uninterrupted run's)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _wait_for_step(out: Path, step: int, alive, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        log = out / 'log.jsonl'
        if log.is_file() and max([r.get('step', 0) for r in _rows(out)] or [0]) >= step:
            return
        time.sleep(0.02)


def test_crash_then_resume_matches_the_uninterrupted_run(resume_pack, val_pack, tmp_path, one_thread):
    """SIGKILL mid-run (decoding in a worker), then --resume: nothing but the steps since the last checkpoint is
    lost, and every loss after it equals the uninterrupted run's (decoding in the main process)."""
    out_a, out = tmp_path / 'a', tmp_path / 'b'
    face.main(['--data', str(resume_pack), '--output', str(out_a), '--val', str(val_pack), '-j', '0',
               '--no-export', *RESUME_FLAGS])
    # the killed run: train.face in a process from a forkserver (the CLI's own process is tested by
    # test_cli_subprocess_prints_one_line and the torchrun test), its DataLoader worker forked below it
    log = tmp_path / 'b.log'
    proc = _forked(log, face.main, ['--data', str(resume_pack), '--output', str(out), '--val', str(val_pack), '-j',
                                    '1', '--no-export', *RESUME_FLAGS])
    try:
        _wait_for_step(out, 6, proc.is_alive)
        assert proc.is_alive(), f'the run ended (exit code {proc.exitcode}) before step 6:\n{_tail(log)}'
    finally:
        _kill([proc])
    state = json.loads((out / 'last.json').read_text())
    killed_at = max(r.get('step', 0) for r in _rows(out))
    assert 4 <= state['step'] <= killed_at < 16
    assert (out / state['checkpoint']).is_file()
    summary = face.main(['--data', str(resume_pack), '--output', str(out), '--val', str(val_pack), '-j', '1',
                         '--no-export', '--resume', *RESUME_FLAGS])
    assert summary['steps'] == 16
    a = {r['step']: r['loss'] for r in _rows(out_a) if 'loss' in r}
    b = {r['step']: r['loss'] for r in _rows(out) if 'loss' in r}
    assert sorted(b) == list(range(1, 17))  # the lost steps were logged again, once
    for step in range(state['step'] + 1, 17):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
    from safetensors.torch import load_file
    final_a, final_b = load_file(str(out_a / 'checkpoint-00000016.safetensors')), \
        load_file(str(out / 'checkpoint-00000016.safetensors'))
    for key in ('model.head.proj.weight', 'ema.head.proj.weight', 'head.weight'):
        torch.testing.assert_close(final_b[key], final_a[key], rtol=1e-5, atol=1e-7)
    assert sorted(p.name for p in out.glob('checkpoint-*')) == ['checkpoint-00000016.safetensors']


def _torchrun(args):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=2', '-m', 'train.face',
           *args]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                          timeout=300)


def _rank(rank: int, world: int, port: int, argv) -> None:
    """One process of a job as torchrun starts it: its environment (RANK, WORLD_SIZE, the rendezvous address), then
    the command."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    face.main(argv)


def _forked_job(argv, logs: Path, world: int = 2):
    """`torchrun --nproc-per-node=world -m train.face argv` without its 3 Python + torch starts: the ranks forked from
    a forkserver, each with torchrun's environment and one thread (a real torchrun launch is tested alongside)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return [_forked(logs / f'rank{rank}.log', _rank, rank, world, port, argv) for rank in range(world)]


def _kill(job) -> None:
    """SIGKILL every process of the job (those still running) and reap them."""
    for p in job:
        p.kill()
    for p in job:
        p.join()


def test_torchrun_two_processes_on_gloo_sharded_head_crash_and_resume(tmp_path, samples, val_pack, capsys):
    """Two processes on gloo (the sharded margin head by default): each writes its own slice of the centres with
    every checkpoint; after SIGKILL of the whole job, --resume on two processes continues into the uninterrupted
    run's losses; one process cannot resume it."""
    folder = write_image_folder(tmp_path / 'folder', samples)
    out, out_b = tmp_path / 'ddp', tmp_path / 'ddp_b'
    common = [*TINY, '--data', str(folder), '--epochs', '1', '-b', '4', '--lr', '0.01', '--log-interval', '1',
              '-j', '0',
              '--no-export', '--checkpoint-every', '4', '--val', str(val_pack)]
    proc = _torchrun([*common, '--output', str(out)])  # the user's launcher, once
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 prints the summary
    assert summary['world_size'] == 2 and summary['num_classes'] == 8
    assert summary['total_steps'] == 8  # 64 images / (2 processes x 4)
    head = summary['head']
    assert head['kind'] == 'sharded' and head['classes_per_process'] == 4
    assert head['per_process_mb'] == pytest.approx(4 * 512 * 4 * 2 / 2 ** 20)  # centres + SGD momentum, 1/2 each
    assert 'head: 8 classes, 2 shards, 4 on this process' in proc.stderr
    rows = [r for r in _rows(out) if 'loss' in r]
    assert [r['step'] for r in rows] == list(range(1, 9)) and all(math.isfinite(r['loss']) for r in rows)
    state = json.loads((out / 'last.json').read_text())
    assert state['run']['world_size'] == 2 and state['run']['head'] == 'sharded'
    from safetensors.torch import load_file
    shards = [load_file(str(out / name)) for name in state['head_shards']]
    assert [s['head.weight'].shape for s in shards] == [(4, 512), (4, 512)]
    assert 'head.weight' not in load_file(str(out / state['checkpoint']))
    assert sorted(p.name for p in out.glob('checkpoint-*')) == sorted([state['checkpoint'], *state['head_shards']])

    # the same job again, SIGKILLed whole (both processes) after step 5, then resumed on two processes
    killed, resumed = tmp_path / 'killed', tmp_path / 'resumed'  # the ranks' output
    killed.mkdir()
    resumed.mkdir()
    job = _forked_job([*common, '--output', str(out_b)], killed)
    try:
        _wait_for_step(out_b, 5, lambda: all(p.is_alive() for p in job), timeout=240)
        assert all(p.is_alive() for p in job), [(p.exitcode, _tail(killed / f'rank{r}.log')) for r, p in enumerate(job)]
    finally:
        _kill(job)
    assert json.loads((out_b / 'last.json').read_text())['step'] == 4
    job = _forked_job([*common, '--output', str(out_b), '--resume'], resumed)
    try:
        for p in job:
            p.join(300)
        assert [p.exitcode for p in job] == [0, 0], [_tail(resumed / f'rank{r}.log') for r in range(2)]
    finally:
        _kill(job)
    a = {r['step']: r for r in rows}
    b = {r['step']: r for r in _rows(out_b) if 'loss' in r}
    assert sorted(b) == list(range(1, 9))
    for step in range(5, 9):
        assert b[step]['loss'] == pytest.approx(a[step]['loss'], rel=1e-5), step
        assert b[step]['grad_norm'] == pytest.approx(a[step]['grad_norm'], rel=1e-4), step

    # the run's world size and head are part of it: a single process cannot resume it
    line = face_error(capsys, [*common, '--output', str(out), '--resume'])
    assert line.startswith('error: --resume:') and "head='sharded', world_size=2" in line, line


# ----------------------------------------------------------------------------------------------------------------


def _quick(data, out):
    return [*TINY, '--data', str(data), '--output', str(out), '--epochs', '1', '-b', '8', '-j', '0',
            '--no-export']


def test_one_process_sharded_adaface_run_and_what_it_refuses(tmp_path, caplog, capsys):
    """--head sharded on one process: one shard of every class, said once; AdaFace trains and its feature-norm
    EMA is checkpointed with the shard; resuming with the other head kind, or bad AdaFace/head flags: one line."""
    pack = write_rec_pack(tmp_path / 'r', identity_images(4, 4, seed=2))
    argv = _quick(pack, tmp_path / 'o') + ['--loss', 'adaface', '--head', 'sharded', '--checkpoint-every', '1']
    with caplog.at_level('WARNING', logger='train'):
        summary = face.main(argv)
    assert summary['steps'] == 2 and math.isfinite(summary['last_loss'])
    assert summary['head']['kind'] == 'sharded' and summary['head']['classes_per_process'] == 4
    assert any('--head sharded with one process' in r.getMessage() for r in caplog.records)
    from safetensors.torch import load_file
    state = json.loads((tmp_path / 'o' / 'last.json').read_text())
    shard = load_file(str(tmp_path / 'o' / state['head_shards'][0]))
    assert shard['head.weight'].shape == (4, 512) and shard['head.batch_mean'].item() != 20.0
    capsys.readouterr()
    line = face_error(capsys, argv[:-4] + ['--loss', 'adaface', '--head', 'replicated', '--resume'])
    assert "head='sharded'" in line and "now head='replicated'" in line
    assert 'adaface' in face_error(capsys, _quick(pack, tmp_path / 'p') + ['--loss', 'adaface', '-b', '1'])
    for flag, value in [('--adaface-t-alpha', '2'), ('--sample-rate', '0'), ('--head', 'split')]:
        with pytest.raises(SystemExit) as e:  # --head split: argparse's usage + error; the others: one line
            face.main(_quick(pack, tmp_path / 'q') + [flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / 'p' / 'last.json').exists() and not (tmp_path / 'q').exists()


def test_bad_magic_names_its_offset(tmp_path, samples, capsys):
    pack = write_rec_pack(tmp_path / 'r', samples)
    offset = int((pack / 'train.idx').read_text().splitlines()[5].split('\t')[1])
    raw = bytearray((pack / 'train.rec').read_bytes())
    raw[offset:offset + 4] = b'\xde\xad\xbe\xef'
    (pack / 'train.rec').write_bytes(bytes(raw))
    line = face_error(capsys, _quick(pack, tmp_path / 'out'))
    assert f'bad magic 0xefbeadde at offset {offset}' in line


def test_label_outside_the_identity_range(tmp_path, samples, capsys):
    pack = write_rec_pack(tmp_path / 'r', samples)
    (pack / 'property').write_text('6,112,112')  # labels 6 and 7 are out of range
    line = face_error(capsys, _quick(pack, tmp_path / 'out'))
    assert 'outside the identity range 0..5' in line and 'record' in line and 'offset' in line


def test_missing_idx_and_empty_folder(tmp_path, samples, capsys):
    pack = write_rec_pack(tmp_path / 'r', samples)
    (pack / 'train.idx').unlink()
    assert 'train.idx: no such file' in face_error(capsys, _quick(pack, tmp_path / 'o1'))
    (tmp_path / 'empty' / 'someone').mkdir(parents=True)
    assert 'no images found' in face_error(capsys, _quick(tmp_path / 'empty', tmp_path / 'o2'))
    assert 'no such folder' in face_error(capsys, _quick(tmp_path / 'nowhere', tmp_path / 'o3'))


def test_wrong_image_size_and_bad_val_pack(tmp_path, capsys):
    small = identity_images(identities=2, per_identity=4, size=(96, 96))
    pack = write_rec_pack(tmp_path / 'r', small)
    assert 'is 96x96, expected aligned 112x112' in face_error(capsys, _quick(pack, tmp_path / 'o1'))
    good = write_rec_pack(tmp_path / 'g', identity_images(identities=2, per_identity=4))
    (tmp_path / 'bad.bin').write_bytes(b'not a pickle')
    line = face_error(capsys, _quick(good, tmp_path / 'o2') + ['--val', str(tmp_path / 'bad.bin')])
    assert 'bad.bin' in line and 'not an insightface .bin pack' in line


def test_an_existing_run_is_never_overwritten(run_a, rec_pack, capsys):
    out, _ = run_a
    before = (out / 'last.json').read_bytes()
    line = face_error(capsys, _quick(rec_pack, out))
    assert 'holds a run' in line and '--resume' in line
    line = face_error(capsys, ['--data', str(rec_pack), '--output', str(out), '--resume', '-j', '0',
                                *RUN_FLAGS[:-2], '--seed', '4'])
    assert 'seed=3' in line  # a resumed run keeps its flags
    assert (out / 'last.json').read_bytes() == before
    assert '--resume: no last.json' in face_error(capsys, _quick(rec_pack, out.parent / 'fresh') + ['--resume'])


def test_channels_last_is_refused_on_cpu(resume_pack, tmp_path, capsys):
    line = face_error(capsys, _quick(resume_pack, tmp_path / 'out') + ['--channels-last'])
    assert 'oneDNN#6035' in line and not (tmp_path / 'out' / 'log.jsonl').exists()


def test_cli_subprocess_prints_one_line(tmp_path):
    (tmp_path / 'empty').mkdir()
    proc = subprocess.run([sys.executable, '-m', 'train.face', '--data', str(tmp_path / 'empty'), '--output',
                           str(tmp_path / 'out')], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.strip().splitlines() == [f'error: {tmp_path / "empty"}: no images found (expected one '
                                                f'folder per identity with .jpg/.png files)']


OPTION_FLAGS = [*TINY, '--epochs', '1', '-b', '8', '--lr', '1e-3', '--log-interval', '1', '--checkpoint-every', '2',
                '--loss', 'cosface', '--opt', 'adamw', '--sched', 'poly', '--warmup-epochs', '0.25', '--amp',
                '--clip-grad', '5', '--grad-checkpointing', '--no-export', '-j', '0']


def test_interrupt_then_resume_with_adamw_amp_poly_cosface(resume_pack, tmp_path, monkeypatch, capsys):
    """Ctrl-C after step 3 keeps the step-2 checkpoint; AdamW's step counts, the poly schedule, bfloat16 autocast,
    clipping and grad checkpointing all resume into the uninterrupted run's losses."""
    face.main(['--data', str(resume_pack), '--output', str(tmp_path / 'a'), *OPTION_FLAGS])
    checkpoint_at, save = [], loop.Trainer.save_checkpoint

    def saved(self):
        checkpoint_at.append(self.step)
        save(self)
    monkeypatch.setattr(loop.Trainer, 'save_checkpoint', saved)
    interrupt_then_resume(monkeypatch, ['--data', str(resume_pack), '--output', str(tmp_path / 'b'), *OPTION_FLAGS])
    assert 'resume with --resume' in capsys.readouterr().err
    assert checkpoint_at == [2, 4, 6, 8]  # interrupted after the step-2 checkpoint; resumed from it
    a = {r['step']: r for r in _rows(tmp_path / 'a') if 'loss' in r}
    b = {r['step']: r for r in _rows(tmp_path / 'b') if 'loss' in r}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(3, 9):
        assert b[s]['loss'] == pytest.approx(a[s]['loss'], rel=1e-6) and b[s]['lr'] == a[s]['lr']
        assert b[s]['grad_norm'] == pytest.approx(a[s]['grad_norm'], rel=1e-5)
    # poly (power 2) after the 2-step warmup
    assert [b[s]['lr'] for s in (1, 2, 3)] == pytest.approx([0.0, 5e-4, 1e-3])
    assert b[5]['lr'] == pytest.approx(1e-3 * (1 - 2 / 6) ** 2)


def test_initial_checkpoint_starts_from_its_weights(run_a, resume_pack, tmp_path, capsys):
    from safetensors.torch import load_file
    out, _ = run_a
    args = face.parse_args([*TINY, '--data', str(resume_pack), '--output', str(tmp_path / 'ft'),
                            '--initial-checkpoint', str(out / 'best.safetensors'), '-j', '0', '-b', '8'])
    given = dict(vars(args))
    trainer = loop.Trainer(args, World('cpu'))
    assert vars(args) == given and args.head is None  # building rewrites no flag: the run holds what it resolved
    assert trainer.run.model.head_kind == 'replicated' and trainer.run.optim.total_steps == 20 * 8  # 64 images, -b 8
    saved = load_file(str(out / 'best.safetensors'))
    state = trainer.run.model.backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert trainer.run.model.head.weight.shape == (16, 512)  # a new margin head for the new identities
    line = face_error(capsys, _quick(resume_pack, tmp_path / 'o') + ['--initial-checkpoint', str(tmp_path / 'no')])
    assert 'no such file' in line


MERGED_FLAGS = [*TINY, '--epochs', '1', '-b', '8', '--lr', '1e-3', '--warmup-epochs', '0', '--log-interval', '1',
                '--checkpoint-every', '2', '--loss', 'cosface', '--no-export', '-j', '0']


def test_merged_train_form_trains_as_the_branches_and_resumes(resume_pack, tmp_path, monkeypatch, capsys):
    """--train-form merged: the branches' first loss (float32), checkpoints in the branches' keys, exact resume
    after Ctrl-C; the bad combinations are refused with one line. (Later steps are not compared: on a fresh model
    float32 rounding of either form moves the second loss by percents against float64, tests/test_merged.py
    checks the forms' equality in float64.)"""
    from safetensors.torch import load_file
    a = face.main(['--data', str(resume_pack), '--output', str(tmp_path / 'a'), *MERGED_FLAGS])
    merged = ['--data', str(resume_pack), '--train-form', 'merged', *MERGED_FLAGS]
    b = face.main(merged + ['--output', str(tmp_path / 'b')])
    c = interrupt_then_resume(monkeypatch, merged + ['--output', str(tmp_path / 'c')])
    assert a['train_form'] == 'branches' and b['train_form'] == c['train_form'] == 'merged' and c['steps'] == 8
    assert b['first_loss'] == pytest.approx(a['first_loss'], rel=1e-4)
    lb = {r['step']: r['loss'] for r in _rows(tmp_path / 'b') if 'loss' in r}
    lc = {r['step']: r['loss'] for r in _rows(tmp_path / 'c') if 'loss' in r}
    assert sorted(lb) == sorted(lc) == list(range(1, 9))
    for step in range(3, 9):  # resumed from the step-2 checkpoint
        assert lc[step] == pytest.approx(lb[step], rel=1e-6), step
    ka = load_file(str(tmp_path / 'a' / 'checkpoint-00000008.safetensors'))
    kb = load_file(str(tmp_path / 'b' / 'checkpoint-00000008.safetensors'))
    assert sorted(ka) == sorted(kb)
    capsys.readouterr()
    quick = ['--data', str(resume_pack), '-j', '0', '-b', '8', '--no-export']
    assert 'no merged training form' in face_error(
        capsys, quick + ['--output', str(tmp_path / 'm'), '--model', 'mobilefacenet', '--train-form', 'merged'])
    assert 'not exact for DBB blocks' in face_error(
        capsys, quick + ['--output', str(tmp_path / 'd'), '--model', 'mobileone_112_dbb_test', '--train-form',
                         'merged'])
    # a run resumes in the form it started with
    line = face_error(capsys, ['--data', str(resume_pack), '--output', str(tmp_path / 'c'), *MERGED_FLAGS,
                               '--resume'])
    assert "train_form='merged'" in line
    assert not (tmp_path / 'm').exists() and not (tmp_path / 'd').exists()


def test_compile_refused_where_it_cannot_compile(resume_pack, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError('Compiler: cc is not found\nmore detail')
    monkeypatch.setattr(torch, 'compile', broken)
    line = face_error(capsys, ['--data', str(resume_pack), '--output', str(tmp_path / 'c'), '-j', '0', '--compile'])
    assert line.startswith('error: --compile: torch.compile (backend inductor) does not work') and 'cc is not' in line
    assert not (tmp_path / 'c').exists()


def test_margin_run_with_augmentation_on_the_device(rec_pack, tmp_path):
    """Augmentation without a teacher (a margin run): it trains, and the card says how, naming no teacher."""
    out = tmp_path / 'aug'
    summary = face.main(['--data', str(rec_pack), '--output', str(out), '-j', '0', *TINY, '--epochs', '1', '-b', '16',
                         '--lr', '0.01', '--crop-scale', '0.8', '1', '--rotate', '8', '--color-jitter', '0.3',
                         '--tag', 'synthetic_arcface'])
    assert summary['augment']['rotate'] == 8.0 and summary['teacher'] is None and math.isfinite(summary['last_loss'])
    card = (out / 'hub' / 'README.md').read_text()
    assert 'augmented on the device (crops of 0.8-1 of the area, rotation up to 8, colour jitter 0.3)' in card
    assert 'teacher' not in card.lower() and 'license: apache-2.0' in card
