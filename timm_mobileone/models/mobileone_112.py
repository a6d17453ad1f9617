""" MobileOne for 112x112 face recognition

`MobileOne: An Improved One millisecond Mobile Backbone` - https://arxiv.org/abs/2206.04040
Origin: https://github.com/apple/ml-mobileone (Apple sample code licence), as implemented in timm's
`timm/models/byobnet.py` (Apache-2.0), whose `MobileOneBlock` and ByobNet stage builder this file reuses.

Differences from the paper / timm's `mobileone_s*`:
* Stage 1 does not downsample, so a 112x112 aligned face crop goes 112 -> 56 (stem) -> 56 -> 28 -> 14 -> 7
  (reduction 16, not 32). With stride 1 the first depthwise block of stage 1 gains MobileOne's BN skip branch.
* The default head is MobileFaceNet's global depthwise conv ("GDC", https://arxiv.org/abs/1804.07573) instead of
  global average pooling: a depthwise conv whose kernel covers the whole final map + BN, flatten, a linear
  projection to the embedding (`embed_dim`, 512) and BatchNorm1d. `num_classes=0` (default) returns the embedding;
  `num_classes=N` adds a linear classifier after it; `global_pool='avg'` gives timm's usual GAP + fc head.
  The heads live in `heads.py`, shared with MobileFaceNet.
* `inference_mode=True` builds the reparameterized (fused) layout directly, with the same modules and state_dict
  keys as `timm.utils.reparameterize_model(model)` / `model.reparameterize()`, so fused checkpoints load into it.
  Fusion covers every branch of every block and every BatchNorm, the head's BN2d and BatchNorm1d included.
* `head_type='conv1x1'`: the seed note's literal head instead of GDC, a 1x1 conv reducing the channels to
  `head_chs` (+ BN), flattened into the linear embedding layer, then BatchNorm1d.
* `train_form='merged'` (or `model.set_train_form('merged')`): train-time blocks compute their branches' exact
  function as one conv, the batch statistics from the input's moments (`merged.py`); same parameters, keys and
  running statistics.
* The GDC kernel is derived from `img_size` (default 112 -> 7x7). Any other input size is refused with a
  ValueError naming the size the model was built for; build the model with `img_size=` to use another size.

`MobileOne112` takes any block of MobileOneBlock's arguments: the DBB family `mobileone_112_dbb_s0..s4` (`dbb.py`,
registered there) is this model with every block a Diverse Branch Block.

The file reads as timm's `byobnet.py`: the block, the model, the checkpoint filter fn, the architecture cfgs and
`_create`, the pretrained cfgs, the entrypoints. Pretrained loading (`loading.py`) and its advice text
(`timm_mobileone.hub_files`) live elsewhere.

Hacked together by the timm-mobileone contributors.
"""
import logging
import re
from dataclasses import replace
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, create_conv2d, get_device_dtype, to_2tuple
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models import reparameterize_model
from timm.models._features import feature_take_indices  # private helper (timm>=1.0.31), also in mobilefacenet.py
from timm.models.byobnet import (
    ByoModelCfg,
    MobileOneBlock as _TimmMobileOneBlock,
    _mobileone_bcfg,
    create_byob_stages,
    get_layer_fns,
    update_block_kwargs,
)

from ..hub_files import face_weights_advice
from .heads import (
    GDC_POOL, GDCHead, HEAD_TYPES, check_global_pool, check_num_classes, feat_size_for, reset_face_classifier)
from .loading import fused_weights_source, require_weights, upstream_checkpoint_hook
from .merged import check_train_form, merged_forward

__all__ = ['MobileOneBlock', 'MobileOne112']

_logger = logging.getLogger(__name__)

FACE_MEAN = (0.5, 0.5, 0.5)
FACE_STD = (0.5, 0.5, 0.5)


class MobileOneBlock(_TimmMobileOneBlock):
    """timm's MobileOneBlock, with an `inference_mode=True` layout that computes what the reparameterized one does.

    timm (1.0.31) builds the inference-mode `reparam_conv` without padding, while `reparameterize()` copies the
    branch convs' padding: the two layouts share keys but not outputs. Here both use the branch convs' padding.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 3,
            stride: int = 1,
            inference_mode: bool = False,
            train_form: str = 'branches',
            **kwargs: Any,
    ) -> None:
        """
        Args:
            in_chs: Input channels.
            out_chs: Output channels.
            kernel_size: Kernel size of the conv branches.
            stride: Stride of the block.
            inference_mode: Build the fused single-conv layout.
            train_form: How the train-time layout computes its branches: 'branches' (each conv + BN as a module,
                timm's forward) or 'merged' (the same function as one conv, `timm_mobileone.models.merged`). Same
                parameters, keys and running statistics either way.
            **kwargs: Remaining `timm.models.byobnet.MobileOneBlock` arguments.
        """
        super().__init__(in_chs, out_chs, kernel_size=kernel_size, stride=stride, inference_mode=inference_mode,
                         **kwargs)
        self.train_form = check_train_form(train_form)
        self.merged_name = ''  # the block's name in its model, for the merged form's refusals (set by the model)
        if inference_mode:
            # the same padding rule as the branch convs (ConvNormAct -> create_conv2d), registered after attn/act
            # as reparameterize() registers it, so both layouts list their state_dict keys in the same order
            dd = get_device_dtype(self._modules.pop('reparam_conv'))
            self.reparam_conv = create_conv2d(
                in_chs, out_chs, kernel_size, stride=stride, groups=self.groups, bias=True, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        if self.train_form == 'merged':
            return self.act(self.attn(self._merged(x)))
        return self.act(self.attn(self.branch_sum(x)))

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        """timm's train-time sum of the branches (before attention and activation), restated here because
        TorchScript cannot call `super().forward()`."""
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out
        for ck in self.conv_kxk:
            out += ck(x)
        out = self.drop_path(out)
        out += identity_out
        return out

    @torch.jit.unused
    def _merged(self, x: torch.Tensor) -> torch.Tensor:
        return merged_forward(self, x)

    # what `MobileOne112.set_train_form` asks every block before it switches any (DBBBlock has its own)
    check_train_form = staticmethod(check_train_form)



class MobileOne112(nn.Module):
    """MobileOne backbone for 112x112 face crops with a GDC embedding head.

    `forward()` returns the (B, embed_dim) embedding for `num_classes=0` (the face default), logits otherwise.
    """

    def __init__(
            self,
            cfg: ByoModelCfg,
            num_classes: int = 0,
            in_chans: int = 3,
            global_pool: str = GDC_POOL,
            embed_dim: int = 512,
            img_size: Union[int, Tuple[int, int]] = 112,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            inference_mode: bool = False,
            head_type: str = 'gdc',
            head_chs: Optional[int] = None,
            train_form: str = 'branches',
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            cfg: Architecture (a ByoModelCfg of MobileOne or DBB blocks, stage 1 at stride 1).
            num_classes: Classifier outputs (0: return the embedding, or the pooled features without GDC).
            in_chans: Input channels.
            global_pool: 'gdc' (the embedding head of `head_type`), a timm pool type ('avg', 'max', ...) or ''
                (no pooling).
            embed_dim: Embedding size of the GDC head.
            img_size: Input size; sets the GDC kernel (112 -> 7x7).
            drop_rate: Dropout before the classifier.
            drop_path_rate: Stochastic depth rate.
            inference_mode: Build the reparameterized (fused) layout.
            head_type: Embedding head: 'gdc' (global depthwise conv, default) or 'conv1x1' (1x1 channel reduction
                flattened into the linear embedding layer).
            head_chs: Channels of the conv1x1 head's reduction (default: the GDC head's parameter budget).
            train_form: How train-time blocks compute their branches: 'branches' (default) or 'merged' (the same
                function, parameters, keys and running statistics, run as one conv per block; see
                `timm_mobileone.models.merged`). Switch later with `set_train_form()`.
        """
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ValueError(f'head_type must be one of {tuple(HEAD_TYPES)}, got {head_type!r}')
        if head_chs is not None:
            _check_positive_int('head_chs', head_chs)
            if head_type != 'conv1x1':
                raise ValueError("head_chs sets the width of head_type='conv1x1'; the GDC head has none")
        check_train_form(train_form)
        _check_positive_int('in_chans', in_chans)
        _check_positive_int('embed_dim', embed_dim)
        check_num_classes(num_classes)
        check_global_pool(global_pool)
        img_size = to_2tuple(img_size)
        if any(not isinstance(s, int) or s < 16 for s in img_size):
            raise ValueError(f'img_size must be an int or (h, w) of ints >= 16, got {img_size!r}')
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.img_size = img_size
        self.feat_size = feat_size_for(img_size)
        self.drop_rate = drop_rate
        self.inference_mode = inference_mode
        self.head_type = head_type
        self.head_chs = head_chs
        self.train_form = train_form
        self.grad_checkpointing = False

        stem_layers = get_layer_fns(cfg, allow_aa=False)
        stage_layers = get_layer_fns(cfg)
        # ByobNet's stem builder ignores block kwargs (no inference_mode), so the stem block is made here, of the
        # stages' block type (MobileOneBlock or DBBBlock)
        stem_block = cfg.blocks[0][0].type
        self.stem = stem_block(
            in_chans, cfg.stem_chs, kernel_size=3, stride=2, inference_mode=inference_mode, layers=stem_layers,
            train_form=train_form, **dd)
        stem_feat = dict(num_chs=cfg.stem_chs, reduction=2, module='stem')

        def _block_kwargs(block_kwargs, block_cfg, model_cfg):
            # timm replaces model-level block_kwargs by block-level ones, so inference_mode is set on every block here
            update_block_kwargs(block_kwargs, block_cfg=block_cfg, model_cfg=model_cfg)
            block_kwargs['inference_mode'] = inference_mode
            block_kwargs['train_form'] = train_form

        self.stages, self.feature_info, _ = create_byob_stages(
            cfg,
            drop_path_rate,
            output_stride=32,
            stem_feat=stem_feat,
            layers=stage_layers,
            block_kwargs_fn=_block_kwargs,
            **dd,
        )
        self.num_features = self.feature_info[-1]['num_chs']
        self.global_pool = global_pool
        self.head = self._create_head(num_classes, global_pool, **dd)
        self.head_hidden_size = self.head.num_features
        for name, m in self.named_modules():
            if isinstance(m, MobileOneBlock):
                m.merged_name = name
        # Apple's checkpoints load through load_state_dict() too (timm's checkpoint_path= skips the filter fn)
        self._register_load_state_dict_pre_hook(_load_state_dict_pre_hook, with_module=True)

    def _create_head(self, num_classes: int, global_pool: str, device=None, dtype=None) -> nn.Module:
        if global_pool == GDC_POOL:
            extra = dict(head_chs=self.head_chs) if self.head_type == 'conv1x1' else {}
            return HEAD_TYPES[self.head_type](
                self.num_features, self.embed_dim, num_classes, feat_size=self.feat_size, img_size=self.img_size,
                drop_rate=self.drop_rate, inference_mode=self.inference_mode, device=device, dtype=dtype, **extra)
        return ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=self.drop_rate, device=device,
            dtype=dtype)

    @torch.jit.ignore
    def set_train_form(self, train_form: str) -> None:
        """Switch how the train-time blocks compute their branches ('branches' or 'merged'); nothing else changes
        (parameters, keys, running statistics). Fused blocks have no branches and ignore it. A block that cannot
        compute it refuses before anything is changed (the DBB family refuses 'merged', see `DBBBlock`)."""
        check_train_form(train_form)
        blocks = [m for m in self.modules() if hasattr(m, 'check_train_form')]
        for m in blocks:  # every block's own check first: a refusal changes nothing
            m.check_train_form(train_form)
        for m in blocks:
            m.train_form = train_form
        self.train_form = train_form

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [(r'^stages\.(\d+)\.(\d+)', None), (r'^head', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier; a new `global_pool` also replaces the head ('gdc' builds a fresh GDC head).

        Args:
            num_classes: Classifier outputs (0: none).
            global_pool: 'gdc', a timm pool type, or '' (no pooling: 4-D output); None keeps the current one.
        """
        reset_face_classifier(self, num_classes, global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features, returning the outputs of the stages named by `indices` too.

        Args:
            x: Input images.
            indices: Take the last n stages if int, all if None, the listed stages if a sequence.
            norm: Unused (no final norm in this model).
            stop_early: Stop after the last stage taken.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Remove the stages (and head) not needed for the intermediates named by `indices`."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x

    @torch.jit.ignore
    def reparameterize(self) -> None:
        """Fuse every block and the head in place (as `timm.utils.reparameterize_model(model, inplace=True)`)."""
        reparameterize_model(self, inplace=True)
        self.inference_mode = True

    @torch.jit.ignore
    def equalization_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """(layer, next layer) pairs of the fused model with only a ReLU between them, for cross-layer equalization
        (`timm_mobileone.deploy.quant.equalize`): consecutive fused blocks (a fused MobileOne or DBB network is a plain
        conv/ReLU chain), then the last block, the GDC conv and the projection. A block whose output passes an SE
        unit (S4) starts no pair: SE is not positive-homogeneous."""
        blocks = [m for m in self.modules() if hasattr(m, 'reparam_conv')]
        if any(b.reparam_conv is None for b in blocks):
            raise ValueError('equalization pairs exist in the fused model: reparameterize first')
        plain = [isinstance(b.act, nn.ReLU) and isinstance(b.attn, nn.Identity) for b in blocks]
        pairs = [(a.reparam_conv, b.reparam_conv) for a, b, ok in zip(blocks, blocks[1:], plain) if ok]
        if isinstance(self.head, GDCHead) and plain[-1] and isinstance(self.head.conv_dw, nn.Conv2d):
            pairs += [(blocks[-1].reparam_conv, self.head.conv_dw), (self.head.conv_dw, self.head.proj)]
        return pairs



def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'{name} must be a positive int, got {value!r}')



_APPLE_KEY_RULES = (
    (r'^stage0\.', 'stem.'),
    (r'^stage(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.'),
    (r'\.rbr_conv\.', '.conv_kxk.'),
    (r'\.rbr_scale\.', '.conv_scale.'),
    (r'\.rbr_skip\.', '.identity.'),
    (r'\.se\.reduce\.', '.attn.fc1.'),
    (r'\.se\.expand\.', '.attn.fc2.'),
    (r'^linear\.', 'head.fc.'),
)


def _remap_apple_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        k = k[len('module.'):] if k.startswith('module.') else k
        for pattern, repl in _APPLE_KEY_RULES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _is_imagenet_checkpoint(state_dict: Dict[str, torch.Tensor]) -> bool:
    """An Apple (`stage0.`, `linear.`) or timm `mobileone_s*` ImageNet state dict, as opposed to one of ours."""
    keys = state_dict.keys()
    if any(k.startswith(('stage0.', 'module.stage0.', 'linear.')) for k in keys):
        return True
    return 'head.fc.weight' in keys and not any(k.startswith('head.proj.') for k in keys)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a state dict to `model` for `pretrained=True` loads: upstream ImageNet MobileOne weights (Apple's keys,
    or timm's `mobileone_s*`), and the classifier of any checkpoint.

    Apple keys are renamed to timm's; what ImageNet weights lack starts from `model`'s own initialization: the
    embedding head, and the BN skip branch that stage 1's first block gains at stride 1. For every checkpoint, a
    classifier (`head.fc`) of the model's shape loads; one of another shape, or none, leaves the model's fc fresh.
    Whatever keeps its random initialization is named in a WARNING. The rest passes through unchanged, so a
    checkpoint of another architecture fails in `load_state_dict` with the keys named. (The cfgs set
    `classifier=None` so that timm leaves the classifier decision to this function: timm drops any classifier
    when the model's num_classes differs from the cfg's.)
    """
    imagenet = _is_imagenet_checkpoint(state_dict)
    state_dict = _remap_apple_keys(state_dict) if imagenet else dict(state_dict)
    own = model.state_dict()
    fc_w, own_fc = state_dict.get('head.fc.weight'), own.get('head.fc.weight')
    if fc_w is not None and (own_fc is None or own_fc.shape != fc_w.shape):
        state_dict.pop('head.fc.weight', None)
        state_dict.pop('head.fc.bias', None)
        if own_fc is not None:
            _logger.warning(f'The checkpoint\'s classifier is {tuple(fc_w.shape)}, the model\'s {tuple(own_fc.shape)}: '
                            f'head.fc starts from random initialization.')
    fresh = [k for k in own if k not in state_dict and (
        k.startswith('head.fc.') or (imagenet and (k.startswith('head.') or '.identity.' in k)))]
    for k in fresh:
        state_dict[k] = own[k]
    if fresh:
        _logger.warning(f'Not in the checkpoint, left at random initialization: {", ".join(fresh)}.')
    return state_dict



_load_state_dict_pre_hook = upstream_checkpoint_hook(_is_imagenet_checkpoint, checkpoint_filter_fn)  # Apple's keys


def _mobileone_112_cfg(
        wf: Tuple[float, float, float, float],
        se_blocks: Tuple[int, ...] = (),
        num_conv_branches: int = 1,
        block: type = None,
        d: Tuple[int, int, int, int] = (2, 8, 10, 1),
) -> ByoModelCfg:
    """MobileOne as timm builds it (`_mobileone_bcfg`), with stage 1 at stride 1 and our inference-mode block
    (`block`: MobileOneBlock; the DBB family swaps in DBBBlock, `dbb.py`)."""
    stages = _mobileone_bcfg(d=d, wf=wf, se_blocks=se_blocks, num_conv_branches=num_conv_branches)
    stages = [[replace(b, type=partial(block or MobileOneBlock)) for b in s] for s in stages]
    stages[0][0] = replace(stages[0][0], s=1)
    return ByoModelCfg(blocks=tuple(tuple(s) for s in stages), stem_type='one', stem_chs=min(64, int(64 * wf[0])))


# width multipliers per stage and branches as in the paper (Table 7) and apple/ml-mobileone's PARAMS
model_cfgs = dict(
    mobileone_112_s0=_mobileone_112_cfg(wf=(0.75, 1.0, 1.0, 2.0), num_conv_branches=4),
    mobileone_112_s1=_mobileone_112_cfg(wf=(1.5, 1.5, 2.0, 2.5)),
    mobileone_112_s2=_mobileone_112_cfg(wf=(1.5, 2.0, 2.5, 4.0)),
    mobileone_112_s3=_mobileone_112_cfg(wf=(2.0, 2.5, 3.0, 4.0)),
    mobileone_112_s4=_mobileone_112_cfg(wf=(3.0, 3.5, 3.5, 4.0), se_blocks=(0, 0, 5, 1)),
    # a tiny member for tests and smoke runs of the machinery (as timm's test_* models): one block pair per stage,
    # a quarter of the widths, two conv branches and an SE block: 1/150 of S0's train-time MACs, 1/47 of its params
    mobileone_112_test=_mobileone_112_cfg(wf=(0.25, 0.25, 0.25, 0.25), se_blocks=(0, 0, 0, 1), num_conv_branches=2,
                                          d=(1, 1, 1, 1)),
)


def _create_mobileone_112(
        variant: str,
        pretrained: bool = False,
        model_cfg: Optional[ByoModelCfg] = None,
        **kwargs,
) -> MobileOne112:
    """Build `variant` from `model_cfg` (default: its entry in `model_cfgs`; the DBB family passes its own)."""
    imagenet = default_cfgs.get(variant)
    imagenet_tag = f'{variant}.apple_in1k' if imagenet is not None and 'apple_in1k' in imagenet.tags else ''
    require_weights(variant, pretrained, kwargs, face_weights_advice(variant, imagenet_tag))
    with fused_weights_source(variant, pretrained, kwargs):  # inference_mode=True loads model_fused.safetensors
        return build_model_with_cfg(
            MobileOne112,
            variant,
            pretrained,
            model_cfg=model_cfg or model_cfgs[variant],
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
            **kwargs,
        )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 0, 'input_size': (3, 112, 112), 'pool_size': (7, 7), 'fixed_input_size': True,
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': FACE_MEAN, 'std': FACE_STD,
        # classifier=None: checkpoint_filter_fn decides whether a checkpoint's head.fc loads (timm would drop it
        # whenever the model's num_classes differs from the cfg's 0, silently keeping a random classifier)
        'first_conv': ('stem.conv_kxk.0.conv', 'stem.conv_scale.conv'), 'classifier': None,
        'paper_ids': 'arXiv:2206.04040', 'origin_url': 'https://github.com/apple/ml-mobileone',
        **kwargs,
    }


def _apple_cfg(variant: str) -> Dict[str, Any]:
    return _cfg(
        hf_hub_id=f'timm/{variant}.apple_in1k',
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        license='other',
        notes=(
            "Apple's ImageNet-1k MobileOne weights (Apple sample code licence) as timm hosts them, trained at "
            "224x224 with ImageNet mean/std and a stride-2 stage 1. Stem and stages load; the GDC head (and the "
            "stride-1 BN skip branch of stage 1's first block) start fresh: a fine-tuning init, not a face "
            "model. With global_pool='avg', num_classes=1000 the ImageNet classifier loads too.",
        ),
    )


# The untagged name resolves to `.untrained` (forced by '*', listed after the tag with weights, which timm would
# otherwise put first): no face weights exist yet, and `pretrained=True` on the bare name must fail clearly rather
# than return ImageNet weights under a random embedding head.
default_cfgs = generate_default_cfgs({
    k: v for i in range(5) for k, v in (
        (f'mobileone_112_s{i}.apple_in1k', _apple_cfg(f'mobileone_s{i}')),
        (f'mobileone_112_s{i}.untrained*', _cfg(license='apache-2.0')),
    )
} | {'mobileone_112_test.untrained': _cfg(license='apache-2.0')})


@register_model
def mobileone_112_s0(pretrained: bool = False, **kwargs) -> MobileOne112:
    """MobileOne-S0 (4 conv branches) for 112x112 faces, GDC embedding head."""
    return _create_mobileone_112('mobileone_112_s0', pretrained=pretrained, **kwargs)


@register_model
def mobileone_112_s1(pretrained: bool = False, **kwargs) -> MobileOne112:
    """MobileOne-S1 for 112x112 faces, GDC embedding head."""
    return _create_mobileone_112('mobileone_112_s1', pretrained=pretrained, **kwargs)


@register_model
def mobileone_112_s2(pretrained: bool = False, **kwargs) -> MobileOne112:
    """MobileOne-S2 for 112x112 faces, GDC embedding head."""
    return _create_mobileone_112('mobileone_112_s2', pretrained=pretrained, **kwargs)


@register_model
def mobileone_112_s3(pretrained: bool = False, **kwargs) -> MobileOne112:
    """MobileOne-S3 for 112x112 faces, GDC embedding head."""
    return _create_mobileone_112('mobileone_112_s3', pretrained=pretrained, **kwargs)


@register_model
def mobileone_112_s4(pretrained: bool = False, **kwargs) -> MobileOne112:
    """MobileOne-S4 (SE in the last 5 blocks of stage 3 and in stage 4) for 112x112 faces, GDC embedding head."""
    return _create_mobileone_112('mobileone_112_s4', pretrained=pretrained, **kwargs)


@register_model
def mobileone_112_test(pretrained: bool = False, **kwargs) -> MobileOne112:
    """A tiny MobileOne-112 for tests and smoke runs (as timm's test_* models): 1 block pair per stage, 1/4 width."""
    return _create_mobileone_112('mobileone_112_test', pretrained=pretrained, **kwargs)

