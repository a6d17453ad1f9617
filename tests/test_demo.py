"""The demo page (`python -m timm_mobileone.faces demo`, issue 48) in a real headless browser: the command serves
it, Debian's Chromium (through Selenium and chromedriver) uploads real photos and reads the answers off the page.

One server for the whole file: insightface's MobileFaceNet (shared data, so the answers mean something) on raw CFP
frontal photos: one person's two photos (compare: cosine 0.678), two people (0.054), at threshold 0.3; then a photo
without a face and a file that is no image. The cosine on the page is the one `compare` prints for the same photos.
Skips (with the reason) without chromium / chromedriver, selenium or gradio, or the shared data; the missing-gradio
error line is checked everywhere.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import SHARED_DATA, run_main

REPO = Path(__file__).resolve().parents[1]
IMAGES = SHARED_DATA / 'cfp_dev' / 'Data' / 'Images'
WEIGHTS = SHARED_DATA / 'mobilefacenet_y1' / 'model-0000.params'
MODEL = ['--model', 'mobilefacenet', '--checkpoint', str(WEIGHTS)]
THRESHOLD = 0.3
SAME = (IMAGES / '001' / 'frontal' / '01.jpg', IMAGES / '001' / 'frontal' / '02.jpg')  # compare: 0.678
DIFFERENT = (IMAGES / '002' / 'frontal' / '01.jpg', IMAGES / '003' / 'frontal' / '01.jpg')  # compare: 0.054


def _browser():
    """(chromium, chromedriver) paths, or skip saying what is missing."""
    pytest.importorskip('selenium', reason='selenium is not installed (the [test] extra)')
    pytest.importorskip('gradio', reason='gradio is not installed (the [demo] or [test] extra)')
    for p in (WEIGHTS, *SAME, *DIFFERENT):
        if not p.is_file():
            pytest.skip(f'{p} not found (shared test data)')
    chromium = next((shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome')
                     if shutil.which(n)), None)
    driver = shutil.which('chromedriver')
    if not chromium or not driver:
        pytest.skip('no chromium / chromedriver binary (apt-get install chromium chromium-driver)')
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """`python -m timm_mobileone.faces demo ... --host 127.0.0.1 --port <free>` (`wait()`: until it says on stderr
    that it serves), its uploads in a folder of its own (GRADIO_TEMP_DIR)."""
    _browser()
    port, uploads = _free_port(), tmp_path_factory.mktemp('gradio')
    proc = subprocess.Popen([sys.executable, '-m', 'timm_mobileone.faces', 'demo', *MODEL,
                             '--threshold', str(THRESHOLD), '--host', '127.0.0.1', '--port', str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, GRADIO_TEMP_DIR=str(uploads)),
                            # Ctrl-C stops it, even where this runs with SIGINT ignored (a background job)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, up = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith('demo: serving'):
                up.set()

    def wait():  # the server loads its model while the test loads its own: waited for when needed
        deadline = time.monotonic() + 180
        while not up.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f'the demo did not start (exit {proc.poll()}):\n{"".join(lines)}')

    threading.Thread(target=read, daemon=True).start()
    yield dict(url=f'http://127.0.0.1:{port}', proc=proc, stderr=lines, uploads=uploads, wait=wait)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope='module')
def browser():
    chromium, chromedriver = _browser()
    from selenium import webdriver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--no-first-run',
                '--window-size=1400,2400'):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    yield driver
    driver.quit()


def _on_page(driver, url, a: Path, b: Path):
    """Open the page, upload photos a and b, press Compare; what the page then shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(url)
    wait = WebDriverWait(driver, 60, poll_frequency=0.1)
    for name, path in zip('ab', (a, b)):
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#upload-{name} input[type=file]'))[0] \
            .send_keys(str(path))
    for name, path in zip('ab', (a, b)):  # uploaded: the component lists the file
        wait.until(lambda d: path.name in ''.join(d.find_element(By.ID, f'upload-{name}').text.split()))
    driver.find_element(By.ID, 'compare').click()
    wait.until(lambda d: d.find_element(By.ID, 'answer').text.strip())
    wait.until(lambda d: all(d.find_element(By.ID, f'message-{n}').text.strip() for n in 'ab'))

    def image_size(elem_id):
        found = driver.find_elements(By.CSS_SELECTOR, f'#{elem_id} img')
        if not found:
            return None
        wait.until(lambda d: d.execute_script('return arguments[0].complete && arguments[0].naturalWidth', found[0]))
        return tuple(driver.execute_script('return [arguments[0].naturalWidth, arguments[0].naturalHeight]',
                                           found[0]))

    return dict(answer=driver.find_element(By.ID, 'answer').text.strip(),
                cosine=driver.find_element(By.CSS_SELECTOR, '#cosine input').get_attribute('value'),
                messages=[driver.find_element(By.ID, f'message-{n}').text.strip() for n in 'ab'],
                faces=[image_size(f'faces-{n}') for n in 'ab'], crops=[image_size(f'crop-{n}') for n in 'ab'])


def test_the_page_answers_as_compare_does(server, browser, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from timm_mobileone.faces import __main__ as M
    # what `compare` prints for the same photos and flags (one embedder for both runs: the flags build the same one)
    faces = M._embedder(M.parse_args(['compare', 'a', 'b', *MODEL]))
    monkeypatch.setattr(M, '_embedder', lambda args: faces)
    expected = []
    for a, b in (SAME, DIFFERENT):
        M.main(['compare', str(a), str(b), *MODEL, '--threshold', str(THRESHOLD)])
        expected.append(json.loads(capsys.readouterr().out))
    assert [e['same'] for e in expected] == [True, False]
    assert expected[0]['cosine'] > THRESHOLD + 0.2 and expected[1]['cosine'] < THRESHOLD - 0.2  # clear answers

    server['wait']()

    for (a, b), want in zip((SAME, DIFFERENT), expected):
        page = _on_page(browser, server['url'], a, b)
        assert page['answer'].startswith('same person' if want['same'] else 'different people'), page
        assert float(page['cosine']) == want['cosine'], (page, want['cosine'])  # both rounded to 6 decimals
        assert f'cosine {want["cosine"]:.4f}' in page['answer'] and 'threshold 0.3000' in page['answer']
        assert all(m.startswith(f'Photo {n}: one face found') for n, m in zip('AB', page['messages'])), page
        assert page['crops'] == [(112, 112), (112, 112)], page
        for path, shown in zip((a, b), page['faces']):  # the photo itself, its faces drawn (at most 1024 a side)
            w, h = Image.open(path).size
            assert shown == (w, h) if max(w, h) <= 1024 else max(shown) == 1024, (shown, (w, h))

    # a photo without a face and a file that is no image: one message each, no answer, nothing to show
    noise, broken = tmp_path / 'noise.png', tmp_path / 'broken.jpg'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(noise)
    broken.write_bytes(b'\xff\xd8\xff\xe0 not a whole jpeg')
    page = _on_page(browser, server['url'], noise, broken)
    assert page['messages'][0].startswith('Photo A: no face found'), page
    assert page['messages'][1].startswith('Photo B cannot be used: cannot be decoded as an image'), page
    assert page['answer'].startswith('no answer: photo A and B have no face'), page
    assert page['cosine'] == '' and page['crops'] == [None, None] and page['faces'][1] is None, page
    assert len([p for p in server['uploads'].rglob('*') if p.is_file()]) >= 4  # the uploads, the pictures shown

    # Ctrl-C: the server stops cleanly, deletes what was uploaded, and prints its one JSON object
    proc = server['proc']
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    assert proc.wait(30) == 0, ''.join(server['stderr'])
    assert json.loads(out)['url'] == server['url'] and 'Traceback' not in ''.join(server['stderr'])
    assert [p for p in server['uploads'].rglob('*') if p.is_file() and p.stat().st_size] == []  # (gradio 6.31
    # leaves one empty temporary file per upload)


def test_without_gradio_one_error_line_names_the_extra(monkeypatch):
    """Before any model loads: a missing gradio is one `error:` line naming the extra, exit code 2."""
    monkeypatch.setitem(sys.modules, 'gradio', None)  # `import gradio` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, 'timm_mobileone.faces.demo', raising=False)
    r = run_main('timm_mobileone.faces.__main__', 'demo', '--model', 'no_such_model', '--port', '1')
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr.strip() == "error: the demo needs gradio: pip install 'timm-mobileone[demo]'"
