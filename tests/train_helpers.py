"""Helpers for the training tests (a module of its own, not conftest: imported by name where used)."""
import pytest

from train import face


def interrupt_then_resume(monkeypatch, argv, at_step: int = 3):
    """Run `train.face` with Ctrl-C raised before step `at_step + 1` (exit 130, the last checkpoint kept), then
    `--resume` it uninterrupted; returns the resumed run's summary."""
    step = face.Trainer.train_step

    def interrupted(self, images, labels):
        if self.step == at_step:
            raise KeyboardInterrupt
        return step(self, images, labels)

    monkeypatch.setattr(face.Trainer, 'train_step', interrupted)
    with pytest.raises(SystemExit) as e:
        face.main(argv)
    assert e.value.code == 130
    monkeypatch.setattr(face.Trainer, 'train_step', step)
    return face.main(argv + ['--resume'])


def face_error(capsys, argv) -> str:
    """`train.face` refusing `argv`: exit code 2 and one `error:` line, no traceback; returns the line."""
    with pytest.raises(SystemExit) as e:
        face.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith('error: ') and 'Traceback' not in '\n'.join(err)
    return err[-1]
