"""train.optim: the optimizer's parameter groups, the lr and weight-decay schedules, and the optimizer state's round
trip through checkpoint form, each without a training run."""
import math

import pytest
import torch

from train import face
from train.optim import (build_lr_scheduler, build_optimizer, load_optimizer, optimizer_tensors, set_weight_decay,
                         weight_decay_at)


def _model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4, 2))


def _args(*flags):
    return face.parse_args(['--data', 'x', '--output', 'y', *flags])


def test_no_weight_decay_on_norm_and_bias_parameters():
    model = _model()
    opt = build_optimizer(model, _args())
    set_weight_decay(opt, 3e-5)
    decay = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert decay == {id(model[0].weight), id(model[3].weight)}
    assert isinstance(opt, torch.optim.SGD) and opt.defaults['momentum'] == 0.9 and not opt.defaults['nesterov']
    assert all(g['weight_decay'] in (0.0, 3e-5) for g in opt.param_groups)


@pytest.mark.parametrize('sched', ['cosine', 'poly'])
def test_lr_warms_up_linearly_then_anneals_to_min_lr(sched):
    args = _args('--lr', '0.1', '--sched', sched, '--warmup-lr', '0.0', '--min-lr', '0.001')
    opt = build_optimizer(_model(), args)
    scheduler = build_lr_scheduler(opt, args, total_steps=110, warmup_steps=10)
    lrs = []
    for step in range(111):
        scheduler.step_update(step)
        lrs.append(opt.param_groups[0]['lr'])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.05) and lrs[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after the warmup
    assert lrs[110] == pytest.approx(0.001, abs=1e-9)
    assert {g['lr'] for g in opt.param_groups} == {lrs[-1]}  # every group, decay or not


def test_weight_decay_anneals_by_cosine_and_spares_the_no_decay_groups():
    assert weight_decay_at(0, 100, 5e-4, 5e-5) == 5e-4
    assert weight_decay_at(50, 100, 5e-4, 5e-5) == pytest.approx((5e-4 + 5e-5) / 2)
    assert weight_decay_at(100, 100, 5e-4, 5e-5) == pytest.approx(5e-5) == weight_decay_at(500, 100, 5e-4, 5e-5)
    opt = build_optimizer(_model(), _args())
    set_weight_decay(opt, weight_decay_at(25, 100, 5e-4, 0.0))
    assert sorted(g['weight_decay'] for g in opt.param_groups) == [0.0, pytest.approx(5e-4 * (1 + math.cos(
        math.pi / 4)) / 2)]


@pytest.mark.parametrize('opt_name', ['sgd', 'adamw'])
def test_optimizer_state_round_trips_through_checkpoint_form(opt_name):
    """Tensors (for safetensors) and the JSON-able rest, loaded back: the next step is the same step."""
    import json
    torch.manual_seed(0)
    model = _model()
    args = _args('--opt', opt_name)
    opt = build_optimizer(model, args)
    x = torch.randn(4, 3, 3, 3)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    tensors, rest = optimizer_tensors(opt)
    assert tensors and all(k.startswith('optimizer.') for k in tensors)
    rest = json.loads(json.dumps(rest))  # last.json holds it
    twin = _model()
    twin.load_state_dict(model.state_dict())
    opt2 = build_optimizer(twin, args)
    load_optimizer(opt2, {k: v.clone() for k, v in tensors.items()}, rest)
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
