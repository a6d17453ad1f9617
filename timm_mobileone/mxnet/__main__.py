"""Convert insightface's MXNet checkpoint to a safetensors file that plain timm loads with `checkpoint_path=`.

    python -m timm_mobileone.mxnet --model mobilefacenet --params model-0000.params --out mobilefacenet.safetensors
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from timm.utils import reparameterize_model

from ..checkpoints import create_model_checked
from ..cli import cli
from ..files import save_safetensors

__all__ = ['main']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m timm_mobileone.mxnet', description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('-m', '--model', default='mobilefacenet', help='the timm model the checkpoint is for')
    parser.add_argument('--params', required=True, help='the MXNet PREFIX-NNNN.params file')
    parser.add_argument('--out', required=True, help='the safetensors file to write (timm state dict)')
    parser.add_argument('--fused', action='store_true',
                        help='write the reparameterized (BN-folded) state dict, for inference_mode=True models')
    return parser.parse_args(argv)


@cli
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Convert an MXNet checkpoint to safetensors; one JSON object on stdout, user errors exit 2."""
    args = parse_args(argv)
    model = create_model_checked(args.model, checkpoint=args.params).eval()
    if args.fused:
        model = reparameterize_model(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(args.out, state, metadata={'format': 'pt', 'source': Path(args.params).name,
                                                'form': 'fused' if args.fused else 'train'})
    result = dict(model=args.model, params=args.params, out=args.out, fused=args.fused, tensors=len(state),
                  parameters=int(sum(v.numel() for k, v in state.items() if v.is_floating_point())))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
