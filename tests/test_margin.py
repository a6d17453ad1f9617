"""train.margin: ArcFace / CosFace margin heads (the margin on the target logit only, ArcFace's monotonic form past
pi, a falling loss on separable toy data) and what they refuse."""
import math

import pytest
import torch

from train.margin import MarginHead


@pytest.mark.parametrize('kind, m', [('arcface', 0.5), ('cosface', 0.4)])
def test_margin_only_on_the_target_logit(kind, m):
    torch.manual_seed(0)
    head = MarginHead(16, 5, kind=kind, s=64.0)
    emb = torch.randn(4, 16)
    labels = torch.tensor([0, 3, 1, 4])
    logits, _ = head(emb, labels)
    cos = head.cosine(emb).clamp(-1 + 1e-7, 1 - 1e-7)
    mask = torch.zeros_like(cos, dtype=torch.bool).scatter(1, labels.view(-1, 1), True)
    torch.testing.assert_close(logits[~mask], 64.0 * cos[~mask])
    target = cos[mask]
    expected = torch.cos(torch.acos(target) + m) if kind == 'arcface' else target - m
    torch.testing.assert_close(logits[mask], 64.0 * expected, rtol=1e-5, atol=1e-4)


def test_arcface_target_logit_keeps_decreasing_past_pi():
    head = MarginHead(2, 2, kind='arcface', s=1.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    angles = torch.linspace(2.4, 3.1, 8)  # theta + m beyond pi for the later ones
    emb = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    with torch.no_grad():
        target = head(emb, torch.zeros(8, dtype=torch.long))[0][:, 0]
    assert (target[1:] < target[:-1]).all()
    assert target[-1].item() == pytest.approx(math.cos(3.1) - 0.5 * math.sin(0.5), abs=1e-4)


def test_margin_loss_falls_on_separable_toy_data():
    torch.manual_seed(0)
    centres = torch.randn(4, 8) * 3
    labels = torch.arange(4).repeat(16)
    x = centres[labels] + 0.3 * torch.randn(64, 8)
    encoder = torch.nn.Linear(8, 8)
    head = MarginHead(8, 4, kind='arcface', s=16.0, m=0.3)
    opt = torch.optim.SGD(list(encoder.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(*head(encoder(x), labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_head_arguments():
    with pytest.raises(ValueError, match="one of 'arcface', 'cosface', 'adaface', got 'sphereface'"):
        MarginHead(8, 4, kind='sphereface')
    with pytest.raises(ValueError, match='>= 2 classes'):
        MarginHead(8, 1)


def test_train_face_offers_every_margin_kind_and_only_those(capsys):
    """--loss choices come from the margin module's registry (one list): a new kind is offered where it is built."""
    from train import face, margin
    with pytest.raises(SystemExit):
        face.parse_args(['--help'])
    assert '--loss {' + ','.join((*margin.KINDS, 'none')) + '}' in capsys.readouterr().out
