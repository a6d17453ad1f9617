"""The conformance runner's own contract (`python -m tests.timm_conformance`; CI runs the real thing as its own
step): what it says without timm's tests, and a test file without FEAT_INTER_FILTERS."""
import json

import pytest

from tests import timm_conformance


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        timm_conformance.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1] if err else ''


def test_no_tests_to_be_had_is_one_line(tmp_path, monkeypatch, capsys):
    code, line = _exit(['--timm-tests', str(tmp_path / 'nowhere')], capsys)
    assert code == 2 and line.startswith('error: --timm-tests') and 'test_models.py' in line
    # no cached copy and no registry: the line names the missing file and the way out
    monkeypatch.setenv('PIP_NO_INDEX', '1')
    monkeypatch.setenv('PIP_FIND_LINKS', '')
    code, line = _exit(['--cache', str(tmp_path / 'cache')], capsys)
    assert code == 2 and line.startswith('error: no cached ') and 'test_models.py' in line and '--timm-tests' in line


def test_a_test_file_without_feat_inter_filters_runs_its_first_pass(tmp_path, capsys):
    (tmp_path / 'test_models.py').write_text(
        'import pytest, torch\n'
        'from timm import list_models, create_model\n\n\n'
        "@pytest.mark.parametrize('model_name', list_models(exclude_filters=['*_s[1-4]']))\n"
        'def test_forward(model_name):\n'
        "    if model_name != 'mobileone_112_test':\n"
        "        pytest.skip('one model is enough here')\n"
        '    assert create_model(model_name).eval()(torch.randn(1, 3, 112, 112)).shape == (1, 512)\n')
    result = timm_conformance.main(['--timm-tests', str(tmp_path), '-n', '0'])
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == result
    assert [p['name'] for p in result['passes']] == ['as_released'] and 'FEAT_INTER_FILTERS' in result['note']
    # collection kept to the project's models (timm's own are listed away), their outcomes recorded with reasons
    assert result['passed'] == 1 and result['failed'] == 0 and result['skipped'] >= 2
    assert result['passes'][0]['skips'] == ['Skipped: one model is enough here']
    assert result['hub_repos'] == [f'timm/mobileone_s{i}.apple_in1k' for i in range(5)]
