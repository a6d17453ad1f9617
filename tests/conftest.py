import pytest
import torch

import timm
import timm_mobileone  # noqa: F401  (registers the models)

MODEL_NAMES = timm.list_models(module='mobileone_112')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def calibrate_bn(model: torch.nn.Module, steps: int = 3, batch_size: int = 8, dtype=torch.float32, size: int = 112):
    """A few train-mode passes so BatchNorm running statistics match the activations (then eval mode).

    With fresh-init statistics (mean 0, var 1) MobileOne activations grow by orders of magnitude per block, so
    comparisons of raw outputs mean nothing until the statistics are calibrated.
    """
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(batch_size, 3, size, size, dtype=dtype))
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()
