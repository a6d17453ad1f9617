"""train.checkpoint: the run folder's format (a checkpoint is committed by last.json, written last), the log a
resume truncates and compare_blocks reads, and the run-defining flags a resume keeps; each without a run."""
import json

import pytest
import torch

from timm_mobileone.errors import UserError
from train import checkpoint as ckpt


def test_commit_names_a_complete_checkpoint_and_drops_older_ones(tmp_path):
    for step in (4, 8):
        name = ckpt.checkpoint_name(step)
        ckpt.save_safetensors(tmp_path / name, ckpt.prefixed('model', {'w': torch.full((2,), float(step))}),
                              metadata=dict(step=str(step)))
        ckpt.commit(tmp_path, dict(step=step, checkpoint=name), keep=[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.checkpoint_name(8), ckpt.STATE_NAME]
    state, tensors = ckpt.read(tmp_path)
    assert state['step'] == 8 == ckpt.last_step(tmp_path)
    assert torch.equal(ckpt.strip('model', tensors)['w'], torch.full((2,), 8.0))
    assert ckpt.last_step(tmp_path / 'none') == 0


def test_a_missing_or_corrupt_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UserError, match='--resume: cannot read the checkpoint'):
        ckpt.read(tmp_path)
    ckpt.json_write(tmp_path / ckpt.STATE_NAME, dict(step=4, checkpoint=ckpt.checkpoint_name(4)))
    (tmp_path / ckpt.checkpoint_name(4)).write_bytes(b'\x00' * 10)
    with pytest.raises(UserError, match='--resume: cannot read the checkpoint') as e:
        ckpt.read(tmp_path)
    assert '\n' not in str(e.value)
    with pytest.raises(UserError, match="head shard"):
        ckpt.read_shard(tmp_path, dict(head_shards=[]), 0)


def test_truncate_log_drops_the_steps_a_crash_lost(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.append_log(tmp_path, dict(step=step, loss=1.0 / step))
    ckpt.append_log(tmp_path, dict(step=5, diverged=True, loss='nan'))
    assert [r['step'] for r in ckpt.read_log(tmp_path)] == [1, 2, 3, 4, 5]
    ckpt.truncate_log(tmp_path, 2)
    assert ckpt.read_log(tmp_path) == [dict(step=1, loss=1.0), dict(step=2, loss=0.5)]
    assert ckpt.read_log(tmp_path / 'none') == []
    assert all(json.loads(line) for line in (tmp_path / ckpt.LOG_NAME).read_text().splitlines())


def test_run_flags_a_resume_must_keep(tmp_path):
    saved = dict(model='mobileone_112_s0', lr=0.1, world_size=2, seed=0)
    ckpt.check_run_flags(tmp_path, saved, dict(saved, head='replicated'))  # a run from before --head: its default
    with pytest.raises(UserError, match=r"started with lr=0.1, world_size=2, now lr=0.2, world_size=1") as e:
        ckpt.check_run_flags(tmp_path, saved, dict(saved, lr=0.2, world_size=1))
    assert 'as many as it started with' in str(e.value)
    with pytest.raises(UserError, match="head='replicated'"):
        ckpt.check_run_flags(tmp_path, saved, dict(saved, head='sharded'))
