"""Hub folders: export -> load both forms through timm (local-dir:, hf-hub: via a loopback Hub), cards, push."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import timm
from timm_mobileone import hub, results as R
from timm_mobileone.errors import UserError

from helpers import calibrate_bn, rel_err, run_main
from hub_server import HubServer

REPO = Path(__file__).resolve().parents[1]


def _calibrated_safetensors(folder: Path, model_name: str, batch_size: int = 8):
    """A train-time `model_name` with calibrated BN statistics, and its state dict as safetensors in `folder`."""
    torch.manual_seed(0)
    model = calibrate_bn(timm.create_model(model_name), batch_size=batch_size)
    path = folder / f'{model_name}.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A train-time S0 checkpoint with calibrated BN statistics, as safetensors (3 train-mode passes of 4 images:
    statistics of the activations, at half the cost of the default 8)."""
    return _calibrated_safetensors(tmp_path_factory.mktemp('ckpt'), 'mobileone_112_s0', batch_size=4)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """The same for the tiny `mobileone_112_test` (train-time branches, SE block): for the tests of what export does
    when it stops or refuses, where S0's float64 fusion check would be most of the cost."""
    return _calibrated_safetensors(tmp_path_factory.mktemp('ckpt'), 'mobileone_112_test')


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
    _, ckpt = trained
    out = tmp_path_factory.mktemp('export') / 'mobileone_112_s0.test_tag'
    # result files as the eval CLIs write them (the schema of timm_mobileone.results), with the `rerun` each CLI's
    # own parser makes of a local command line
    from eval import ijb as eval_ijb, lfw as eval_lfw
    results = out.parent / 'lfw.json'
    results.write_text(json.dumps(dict(schema=R.SCHEMA, rows=[dict(
        dataset='lfw', kind='verification', num=6000, accuracy=0.99517, accuracy_std=0.00361, tar_at_far=0.981,
        far_target=0.001, flip=True, threshold=0.3125)], rerun=eval_lfw.parse_args(shlex.split(
            '--model mobileone_112_s0 --checkpoint /tmp/run7/ck.safetensors --data /home/me/faces/lfw.bin '
            '--results-file /tmp/run7/lfw.json -b 32')).rerun)))
    ijb = out.parent / 'ijbc.json'
    ijb.write_text(json.dumps(dict(schema=R.SCHEMA, rows=[dict(
        dataset='ijbc', kind='ijb', num=15658489, flip=True, auc=0.995,
        tar_at_far={'1e-6': 0.41, '1e-5': 0.62, '1e-4': 0.78125, '1e-3': 0.88, '1e-2': 0.95, '1e-1': 0.99})],
        rerun=eval_ijb.parse_args(shlex.split(
            '--checkpoint=/tmp/run7/ck.safetensors --data-dir /home/me/ijb/ --target IJBC --save-features /tmp/f.npy '
            '--plot roc.png')).rerun)))
    summary = hub.export('mobileone_112_s0', str(ckpt), 'test_tag', str(out), results=[str(results), str(ijb)],
                         repo_id='testorg/mobileone_112_s0.test_tag')
    return out, summary


def test_export_writes_the_four_files(exported):
    out, summary = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(hub.EXPORT_FILES)  # no temporary leftovers
    assert summary['fusion_rel_err_float64'] <= 1e-8
    # S0's 4 conv branches and scale/skip branches fold away: the fused file is about 3x smaller
    assert summary['fused_params'] * 2.5 < summary['params']
    assert summary['files']['model_fused.safetensors'] * 2.5 < summary['files']['model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'mobileone_112_s0'
    assert config['num_classes'] == 0 and config['num_features'] == 1024
    assert config['pretrained_cfg']['tag'] == 'test_tag'
    assert config['pretrained_cfg']['input_size'] == [3, 112, 112]
    assert config['pretrained_cfg']['mean'] == [0.5, 0.5, 0.5]


def test_card_parses_with_model_card(exported):
    from huggingface_hub import ModelCard
    out, _ = exported
    card = ModelCard.load(out / 'README.md')
    data = card.data.to_dict()
    assert data['library_name'] == 'timm' and data['pipeline_tag'] == 'image-feature-extraction'
    assert set(hub.CARD_TAGS) <= set(data['tags'])
    assert data['license'] == 'apache-2.0'
    results = data['model-index'][0]['results']
    accuracy = [r for r in results if r['metrics'][0]['type'] == 'accuracy'][0]
    assert accuracy['dataset']['type'] == 'lfw' and accuracy['metrics'][0]['value'] == 0.99517
    text = card.text
    order = [text.index(h) for h in ('# Model card for', '## Model Details', '## Model Usage', '## Model Comparison',
                                     '## Citation')]
    assert order == sorted(order)
    assert 'import timm_mobileone' in text
    # the eval commands as a stranger reruns them: this repo's weights, data by file name, no local paths or outputs
    repo_model = '--model hf-hub:testorg/mobileone_112_s0.test_tag --pretrained'
    assert f'`python -m eval.lfw {repo_model} --data lfw.bin -b 32`' in text
    assert f'`python -m eval.ijb {repo_model} --data-dir ijb --target IJBC`' in text
    assert '/tmp' not in text and '/home' not in text and '--results-file' not in text
    ijb = [r for r in results if r['dataset']['type'] == 'ijbc']
    assert {m['name']: m['value'] for r in ijb for m in r['metrics']}['TAR@FAR=1e-4'] == 0.78125
    assert '| IJB-C | 15658489 pairs | 0.41000 | 0.62000 | 0.78125 |' in text
    assert 'inference_mode=True' in text and 'reparameterize_model' in text


def test_rerun_drops_saved_outputs_and_inputs():
    """An eval's `rerun` is its command as a stranger reruns it from a card: no local weights, outputs or saved
    inputs, data by file name; the card puts the Hub repo's model in front."""
    from eval import ijb as eval_ijb, verify as eval_verify
    rerun = eval_verify.parse_args(['--embeddings', '/a/e.npy', '--data=/d/lfw.bin', '--data', '/d/cfp_fp.bin',
                                    '--save-embeddings', '/o/x.npy', '--amp']).rerun
    assert R.rerun_command(rerun, 'o/n') == \
        'python -m eval.verify --model hf-hub:o/n --pretrained --data lfw.bin --data cfp_fp.bin --amp'
    rerun = eval_ijb.parse_args(['--features', 'f.npy', '--faceness', 's.npy', '--data-dir', '/d/IJB/']).rerun
    assert R.rerun_command(rerun, 'o/n') == 'python -m eval.ijb --model hf-hub:o/n --pretrained --data-dir IJB'
    rerun = eval_ijb.parse_args(['-m', 'hf-hub:x/y', '--save-features', 'f.npy', '--data-dir', 'IJB', '--onnx',
                                 '/m/s0.onnx', '--no-flip']).rerun
    assert R.rerun_command(rerun, 'o/n') == \
        'python -m eval.ijb --model hf-hub:o/n --pretrained --data-dir IJB --onnx s0.onnx --no-flip'
    assert R.rerun_command(None, 'o/n') is None


def test_results_that_are_not_the_schema_are_refused(tmp_path, trained):
    """hub export reads eval results by the schema, not by each CLI's keys: anything else is one error line."""
    _, ckpt = trained
    for text, match in [('{', 'not a readable JSON file'), ('{"accuracy": 0.99}', 'not an eval result of schema'),
                        (json.dumps(dict(schema=R.SCHEMA, rows=[dict(dataset='ijbc', kind='ijb', tar_at_far={})])),
                         'without TAR at FAR')]:
        (tmp_path / 'r.json').write_text(text)
        with pytest.raises(UserError, match=match):
            hub.export('mobileone_112_s0', str(ckpt), 't', str(tmp_path / 'out'), results=[str(tmp_path / 'r.json')])
        assert not (tmp_path / 'out').exists()


def _embed(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_local_dir_loads_both_forms(exported, trained):
    out, _ = exported
    model, _ = trained
    x = torch.randn(2, 3, 112, 112)
    expected = _embed(model, x)
    train = timm.create_model(f'local-dir:{out}', pretrained=True)
    fused = timm.create_model(f'local-dir:{out}', pretrained=True, inference_mode=True)
    assert any('conv_kxk' in k for k in train.state_dict())
    assert not any('conv_kxk' in k for k in fused.state_dict())
    assert rel_err(_embed(train, x), expected) == 0
    assert rel_err(_embed(fused, x), expected) <= 1e-4
    assert tuple(timm.data.resolve_model_data_config(fused)['mean']) == (0.5, 0.5, 0.5)


def test_local_dir_without_fused_file_is_a_clear_error(exported, tmp_path):
    out, _ = exported
    partial = tmp_path / 'partial'
    partial.mkdir()
    for name in ('model.safetensors', 'config.json'):
        (partial / name).write_bytes((out / name).read_bytes())
    with pytest.raises(FileNotFoundError, match='has no model_fused.safetensors'):
        timm.create_model(f'local-dir:{partial}', pretrained=True, inference_mode=True)


@pytest.fixture
def hub_server(exported, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants
    out, _ = exported
    with HubServer({'testorg/mobileone_112_s0.test_tag': out}) as server:
        monkeypatch.setattr(constants, 'ENDPOINT', server.url)
        template = server.url + '/{repo_id}/resolve/{revision}/{filename}'
        monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', template)
        monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_cache'))
        monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
        yield server


def test_hf_hub_train_time_and_fused(hub_server, trained):
    model, _ = trained
    x = torch.randn(2, 3, 112, 112)
    expected = _embed(model, x)

    fused = timm.create_model('hf-hub:testorg/mobileone_112_s0.test_tag', pretrained=True, inference_mode=True)
    assert rel_err(_embed(fused, x), expected) <= 1e-4
    # the fused load fetches the config and the fused weights only
    assert sorted(set(hub_server.files_fetched())) == ['config.json', 'model_fused.safetensors']

    train = timm.create_model('hf-hub:testorg/mobileone_112_s0.test_tag', pretrained=True)
    assert rel_err(_embed(train, x), expected) == 0
    assert 'model.safetensors' in hub_server.files_fetched()


def test_registry_tag_with_hub_id_loads_both_forms(hub_server, trained):
    model, _ = trained
    x = torch.randn(2, 3, 112, 112)
    overlay = dict(hf_hub_id='testorg/mobileone_112_s0.test_tag')
    fused = timm.create_model('mobileone_112_s0', pretrained=True, inference_mode=True, pretrained_cfg_overlay=overlay)
    assert rel_err(_embed(fused, x), _embed(model, x)) <= 1e-4
    assert 'model.safetensors' not in hub_server.files_fetched()
    train = timm.create_model('mobileone_112_s0', pretrained=True, pretrained_cfg_overlay=overlay)
    assert rel_err(_embed(train, x), _embed(model, x)) == 0


def test_hub_repo_without_fused_file(hub_server, exported, tmp_path):
    out, _ = exported
    partial = tmp_path / 'partial'
    partial.mkdir()
    for name in ('model.safetensors', 'config.json'):
        (partial / name).write_bytes((out / name).read_bytes())
    hub_server.repos['testorg/partial'] = partial
    with pytest.raises(RuntimeError, match='model_fused.safetensors not found'):
        timm.create_model('hf-hub:testorg/partial', pretrained=True, inference_mode=True)


def test_offline_with_nothing_cached(hub_server, monkeypatch):
    # in-process: huggingface_hub reads HF_HUB_OFFLINE into its constants at import (the fresh-process test below
    # sets its variables before anything is imported); the server holds the repo, and offline nothing asks for it
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(FileNotFoundError, match='cannot find the requested files in the local cache'):
        timm.create_model('hf-hub:testorg/mobileone_112_s0.test_tag', pretrained=True)
    assert hub_server.requests == []


def test_real_hf_endpoint_env_var_in_a_fresh_process(exported, tmp_path):
    """What users do: HF_ENDPOINT set before anything is imported, the library's own cache layout."""
    out, _ = exported
    with HubServer({'testorg/mobileone_112_s0.test_tag': out}) as server:
        env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / 'hf'), HF_HUB_OFFLINE='0')
        env.pop('HF_HUB_CACHE', None)
        code = ("import timm, timm_mobileone, torch\n"
                "m = timm.create_model('hf-hub:testorg/mobileone_112_s0.test_tag', pretrained=True, "
                "inference_mode=True).eval()\n"
                "print(tuple(m(torch.zeros(1, 3, 112, 112)).shape))")
        proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == '(1, 512)'
        assert (tmp_path / 'hf' / 'hub' / 'models--testorg--mobileone_112_s0.test_tag').is_dir()
        assert set(server.files_fetched()) == {'config.json', 'model_fused.safetensors'}


# ---------------------------------------------------------------------------------------------------------------
# bad input: one clear line, exit code 2, nothing half-written


def _cli(*args):
    """`python -m timm_mobileone.hub args` in-process (run_main; tests/test_wheel.py runs the module as `-m` does,
    from the installed wheel)."""
    return run_main('timm_mobileone.hub', *args)


def _assert_user_error(proc, match):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0] and 'Traceback' not in proc.stderr, proc.stderr


def test_export_of_another_variant_is_refused(trained, tmp_path):
    _, ckpt = trained
    out = tmp_path / 'out'
    proc = _cli('export', '--model', 'mobileone_112_s1', '--checkpoint', str(ckpt), '--tag', 't', '--out', str(out))
    _assert_user_error(proc, 'does not fit mobileone_112_s1')
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_export_of_a_corrupt_safetensors_is_refused(trained, tmp_path, damage):
    _, ckpt = trained
    bad = tmp_path / 'bad.safetensors'
    data = ckpt.read_bytes()
    bad.write_bytes(data[:len(data) // 3] if damage == 'truncated' else b'\x00' * 64)
    out = tmp_path / 'out'
    proc = _cli('export', '--model', 'mobileone_112_s0', '--checkpoint', str(bad), '--tag', 't', '--out', str(out))
    _assert_user_error(proc, 'bad.safetensors: cannot be read')
    assert not out.exists()


def test_export_of_a_fused_checkpoint_is_refused(trained, tmp_path):
    model, _ = trained
    fused = tmp_path / 'fused.pth'
    torch.save(timm.utils.reparameterize_model(model).state_dict(), fused)
    proc = _cli('export', '--model', 'mobileone_112_s0', '--checkpoint', str(fused), '--tag', 't',
                '--out', str(tmp_path / 'o'))
    _assert_user_error(proc, 'already fused')


def test_export_refuses_when_fusion_fails(tiny, tmp_path):
    model, _ = tiny
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd['stages.1.0.conv_kxk.0.bn.running_var'].fill_(float('nan'))
    ckpt = tmp_path / 'nan.pth'
    torch.save(sd, ckpt)
    out = tmp_path / 'out'
    with pytest.raises(UserError, match='refusing to export'):
        hub.export('mobileone_112_test', str(ckpt), 't', str(out))
    assert not out.exists()  # nothing written, not even the folder


def test_interrupted_export_leaves_no_final_file(tiny, tmp_path, monkeypatch):
    _, ckpt = tiny
    out = tmp_path / 'out'

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, 'render_card', boom)
    with pytest.raises(KeyboardInterrupt):
        hub.export('mobileone_112_test', str(ckpt), 't', str(out))
    assert list(out.iterdir()) == []


def test_push_without_token(exported, tmp_path, monkeypatch):
    """In-process, with the environment a subprocess would get (no HF_TOKEN, HF_HOME an empty folder): the token
    file's path is what huggingface_hub made of HF_HOME on import, so it is set as that import would set it."""
    import huggingface_hub.constants as constants
    out, _ = exported
    home = tmp_path / 'empty_home'
    for name in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('HF_HOME', str(home))
    monkeypatch.setattr(constants, 'HF_HOME', str(home))
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(home / 'token'))
    monkeypatch.setattr(constants, 'HF_STORED_TOKENS_PATH', str(home / 'stored_tokens'))
    proc = _cli('push', str(out), '--repo-id', 'testorg/x')
    _assert_user_error(proc, 'no Hugging Face token')


def test_push_checks_the_folder(tmp_path):
    (tmp_path / 'config.json').write_text('{}')
    _assert_user_error(_cli('push', str(tmp_path), '--repo-id', 'testorg/x'), 'missing model.safetensors')
    _assert_user_error(_cli('push', str(tmp_path / 'nope'), '--repo-id', 'testorg/x'), 'no such folder')


def test_push_uploads_the_folder(exported, monkeypatch):
    """push drives huggingface_hub's HfApi: create the repo and branch, upload exactly the exported files."""
    out, _ = exported
    calls = []

    class FakeApi:
        def __init__(self, token=None, **kwargs):
            calls.append(('init', token))

        def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
            calls.append(('create_repo', repo_id, private))
            return type('Url', (), {'repo_id': repo_id})()

        def create_branch(self, repo_id, branch, exist_ok=False):
            calls.append(('create_branch', branch))

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message='', allow_patterns=None):
            calls.append(('upload_folder', repo_id, folder_path, revision, tuple(allow_patterns)))
            return type('Info', (), {'commit_url': f'https://hub/{repo_id}/commit/1'})()

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    result = hub.push(str(out), 'testorg/m', private=True, revision='v1', token='hf_x')
    assert calls == [('init', 'hf_x'), ('create_repo', 'testorg/m', True), ('create_branch', 'v1'),
                     ('upload_folder', 'testorg/m', str(out), 'v1', hub.EXPORT_FILES)]
    assert result['commit_url'].endswith('/commit/1')


def test_card_command_writes_a_card(tmp_path, exported):
    out_card = tmp_path / 'cards' / 'README.md'
    result = hub.main(['card', '--model', 'mobileone_112_s0', '--tag', 'test_tag', '--out', str(out_card)])
    assert result['card'] == str(out_card)
    from huggingface_hub import ModelCard
    card = ModelCard.load(out_card)
    assert card.data.library_name == 'timm'
    assert 'No evaluation results were recorded' in card.text


def test_export_records_the_verification_threshold_and_compare_uses_it(exported, tmp_path):
    """hub export --results puts the model's own same / different threshold into config.json; `faces compare` on the
    exported model answers at it when no threshold is given."""
    from helpers import FACE_PEOPLE, LFW_DEV, face_photo, lfw_crop, run_main
    out, _ = exported
    config = json.loads((out / 'config.json').read_text())
    assert config['face_verification'] == dict(threshold=0.3125, dataset='lfw', accuracy=0.99517,
                                               rule='same when cosine >= threshold')
    assert timm.create_model(f'local-dir:{out}', pretrained=True).pretrained_cfg['tag'] == 'test_tag'  # still loads
    cv2 = pytest.importorskip('cv2')
    if not (LFW_DEV / 'pairs.txt').is_file():
        pytest.skip(f'{LFW_DEV} not found')
    for n in (1, 2):
        cv2.imwrite(str(tmp_path / f'{n}.jpg'), face_photo(lfw_crop(FACE_PEOPLE[0], n), n))
    proc = run_main('timm_mobileone.faces.__main__', 'compare', tmp_path / '1.jpg', tmp_path / '2.jpg', '--model',
                    f'local-dir:{out}')
    result = json.loads(proc.stdout)
    assert result['threshold'] == 0.3125 and 'config.json' in result['threshold_from']
    assert result['same'] == (result['cosine'] >= 0.3125)
