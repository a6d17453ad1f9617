"""Where weights come from: the file names of a Hub folder, and the advice a pretrained load gives when it finds none.

One place for both, because two sides name them: the model families' loaders (`timm_mobileone.models`, which read
`model_fused.safetensors` for `inference_mode=True` and point at the tools when no weights exist) and the tooling that
writes the folders (`timm_mobileone.hub export`). The advice names commands of the repository (`python -m
train.face`) that the model code must not know about.

A leaf: it imports nothing (not even torch), so the model code can import it without reaching any tooling.
"""

__all__ = [
    'WEIGHTS_NAME', 'FUSED_WEIGHTS_NAME', 'CONFIG_NAME', 'CARD_NAME', 'EXPORT_FILES', 'face_weights_advice',
    'MOBILEFACENET_WEIGHTS_ADVICE', 'missing_fused_file', 'missing_fused_hub_file', 'no_fused_weights',
]

# ----------------------------------------------------------------------------------------------------------------
# a Hub folder (written by `python -m timm_mobileone.hub export`, read by timm and by `inference_mode=True` loads)

WEIGHTS_NAME = 'model.safetensors'  # the train-time form: the file timm loads by default
FUSED_WEIGHTS_NAME = 'model_fused.safetensors'  # the reparameterized form, what `inference_mode=True` loads alone
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
EXPORT_FILES = (WEIGHTS_NAME, FUSED_WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)

# ----------------------------------------------------------------------------------------------------------------
# advice: what a `pretrained=True` load says when there is nothing to load

_EXPORT = '`python -m timm_mobileone.hub export`'


def face_weights_advice(variant: str, imagenet_tag: str = '') -> str:
    """The end of "No pretrained weights exist for <variant>.<tag>: ..." for a MobileOne-112 / DBB variant:
    what does exist (the ImageNet tag `imagenet_tag`, if the variant has one), the Hub and local folder forms, a
    checkpoint file, and the trainer."""
    imagenet = (f" For ImageNet initialisation (a fine-tuning start, not a face model) create '{imagenet_tag}'."
                if imagenet_tag else '')
    return (f"no face weights are published for it.{imagenet} For trained face weights create 'hf-hub:<repo id>' or "
            f"'local-dir:<folder>' (written by {_EXPORT}), or pretrained=False with checkpoint_path=<file>; to "
            f"train them: `python -m train.face`.")


MOBILEFACENET_WEIGHTS_ADVICE = (
    "insightface's weights are not hosted here (non-commercial research licence). Load their MXNet file with "
    "--checkpoint model-0000.params in the project's CLIs, or convert it (`python -m timm_mobileone.mxnet "
    "--params model-0000.params --out mobilefacenet.safetensors`) and create it with checkpoint_path=<file>.")


def missing_fused_file(folder: str) -> str:
    """A `local-dir:` folder without the fused file, for `pretrained=True, inference_mode=True`."""
    return (f'{folder} has no {FUSED_WEIGHTS_NAME}, which inference_mode=True loads: drop inference_mode to load '
            f'the train-time weights and fuse them with timm.utils.reparameterize_model(model), or export the '
            f'folder with {_EXPORT}.')


def missing_fused_hub_file(filename: str, variant: str) -> str:
    """A Hub repo without the fused file, for `pretrained=True, inference_mode=True`."""
    return (f'{filename} not found in the Hub repo of {variant}: drop inference_mode=True to load its train-time '
            f'weights, then fuse them with timm.utils.reparameterize_model(model).')


def no_fused_weights(variant: str, tag: str) -> str:
    """A pretrained source that has no fused form (a URL, ImageNet weights) for `inference_mode=True`."""
    return (f'No fused weights exist for {variant}.{tag}: load it without inference_mode=True and call '
            f'model.reparameterize().')
