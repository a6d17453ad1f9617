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


@pytest.fixture
def own_plugins_only(monkeypatch):
    """The inner pytest runs (the runner passes its environment on) without the third-party plugins installed here
    (hypothesis, hydra, anyio, kgb, xdist: over a second of imports per run, and nothing these test files use; `-n 0`
    needs no xdist): what is under test is the runner with pytest, not the plugins of this environment."""
    monkeypatch.setenv('PYTEST_DISABLE_PLUGIN_AUTOLOAD', '1')


def test_a_test_file_without_feat_inter_filters_runs_its_first_pass(tmp_path, capsys, own_plugins_only):
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


@pytest.mark.parametrize('text, message', [
    # pytest exits 5 on it and the runner printed a zero summary, exit 0
    ('def test_nothing():\n    pass\n', 'test_models.py: collected no model test (1 test, none parametrized'),
    # a 37-line collection dump, then the same zero summary
    ('this is (not python\n', "test_models.py: pytest cannot collect it: SyntaxError: '(' was never closed (line 1)"),
    (b'\xff\xfe\x00garbage', 'test_models.py: pytest cannot collect it: SyntaxError: source code string cannot '
                             'contain null bytes'),
    # an error pytest reports while importing the file (the inner session's conftest records it)
    ('import timm\nimport no_such_module_here\n', "pytest cannot collect it: ModuleNotFoundError: No module "
                                                  "named 'no_such_module_here' (line 2)"),
], ids=['no_model_test', 'syntax_error', 'binary', 'import_error'])
def test_a_file_that_gives_no_model_test_fails_in_one_line(text, message, tmp_path, capsys, own_plugins_only):
    path = tmp_path / 'test_models.py'
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SystemExit) as e:
        timm_conformance.main(['--timm-tests', str(path), '-n', '0'])
    out, err = capsys.readouterr()
    # exit 1 as a failed test (not 2, a usage error): the file was in hand, and such a file can be this project's
    # doing too; the first pass stops after collecting it, before anything runs, so the error is all stderr holds
    assert e.value.code == 1 and out == '' and err.count('\n') == 1, err
    assert err.startswith(f'error: {path}: ') and message in err, err


def test_collection_error_reason_is_the_exception_and_the_line():
    reason = timm_conformance._collect_reason
    text = ("ImportError while importing test module\n/x/test_models.py:3: in <module>\n    import nope\n"
            "E   ModuleNotFoundError: No module named 'nope'\n")
    assert reason(text) == "ModuleNotFoundError: No module named 'nope' (line 3)"
    assert reason('    raise RuntimeError("a\\nb")\nE   RuntimeError: a\nE   b\n') == 'RuntimeError: a'
    assert reason('E     File "/t/test_models.py", line 7\nE       def f(:\nE   SyntaxError: invalid syntax') == \
        'SyntaxError: invalid syntax (line 7)'
    assert reason('') == 'no output' and reason('ERROR: usage: something\n') == 'ERROR: usage: something'


def test_a_k_expression_that_selects_no_model_test_is_a_problem():
    problem = timm_conformance.collection_problem
    assert problem(dict(errors=[], total=3, ours=2, selected=0), 'no') == "-k 'no' selects none of its 2 model tests"
    assert problem(dict(errors=[], total=3, ours=2, selected=1), 'fwd') is None
