"""Universally slimmable encoders (Yu & Huang, ICCV 2019, "Universally Slimmable Networks"; used by US3L, Cao, Sun
and Zhou, CVPR 2023): one set of weights, run at any width multiplier in [0.25, 1.0] by using the first k channels.

    net = slimmable_resnet18(width=32, cifar_stem=True)
    set_width(net, 0.5)                      # every slimmable layer now runs its first round(0.5 x C) channels
    feats = net(images)                      # [B, 128]: the first half of the full network's 256 features
    recalibrate_bn(net, 0.5, batches)        # the US-Net step before evaluating at a width (BN statistics only)
    width_cost(net, 0.5, image_size=32)      # {"params": ..., "macs": ...} from torch.utils.flop_counter

How the networks are made: the plain encoder of `trainers.backbones` is built first, then `slimmify` swaps each
Conv2d / Linear / BatchNorm / MultiheadAttention for a slimmable twin holding the *same* parameter tensors under the
same names. So width 1.0 runs the very modules of the plain network (bit for bit the same output) and a plain
network's state dict loads into the slimmable one.

Which dimension slims:

- CNNs (ResNet, MobileNetV2): channels. Every layer's input width is whatever arrives (`x.shape[1]`), its output
  width `active_channels(C, width)`; depthwise convolutions follow their input. MobileNetV2's last 1x1 layer keeps
  its 1280 outputs (US-Net's choice: the feature size does not depend on the width); ResNet's features slim
  (`[B, active_channels(out_dim, width)]`), so the head after it must take a variable input width
  (`SlimmableLinear` with a fixed output).
- ViT: the attention heads and the MLP hidden units (US3L's Table 3), never the embedding: heads
  `max(1, round(3 x width))`, MLP `round(768 x width)`; the class token stays `[B, 192]` at every width.

BN statistics: one set of running statistics, shared by all widths; a network trained with the sandwich rule is
evaluated at a width only after `recalibrate_bn` at that width (reset, cumulative average over a few batches in
train mode, no gradient): the US-Net procedure; training itself uses batch statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.flop_counter import FlopCounterMode

from trainers.backbones.base import NormLayer
from trainers.backbones.mobilenet import MobileNetV2, mobilenet_v2
from trainers.backbones.resnet import ResNet, resnet18, resnet50
from trainers.backbones.vit import ViT, vit_tiny

MIN_WIDTH = 0.25
MAX_WIDTH = 1.0


def check_width(width: Any) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not MIN_WIDTH <= width <= MAX_WIDTH:
        raise ValueError(f"width must be a number in [{MIN_WIDTH}, {MAX_WIDTH}], got {width!r}")
    return float(width)


def active_channels(full: int, width: float) -> int:
    """Channels a layer of `full` channels runs at `width`: round(full x width), at least 1 (width 1.0: all)."""
    return max(1, min(full, math.floor(full * width + 0.5)))


class SlimmableConv2d(nn.Conv2d):
    """A Conv2d running its first `active_channels(out, width)` filters on the channels it receives.

    `slim_out` False keeps every output (a layer whose output size must not depend on the width). A depthwise
    convolution (groups == in == out channels) runs as many channels as it receives.
    """

    width: float = 1.0
    slim_out: bool = True

    def forward(self, x: Tensor) -> Tensor:
        cin = x.shape[1]
        if cin > self.in_channels:
            raise ValueError(f"{type(self).__name__}: input has {cin} channels, the layer at most {self.in_channels}")
        depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels
        if depthwise:
            cout, groups = cin, cin
        elif self.groups == 1:
            cout = active_channels(self.out_channels, self.width) if self.slim_out else self.out_channels
            groups = 1
        else:
            raise ValueError(f"{type(self).__name__}: grouped convolutions other than depthwise cannot slim")
        if cin == self.in_channels and cout == self.out_channels:
            self.active_params = sum(p.numel() for p in self.parameters(recurse=False))
            return super().forward(x)
        weight = self.weight[:cout] if depthwise else self.weight[:cout, :cin]
        bias = None if self.bias is None else self.bias[:cout]
        self.active_params = weight.numel() + (0 if bias is None else bias.numel())
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)


class SlimmableLinear(nn.Linear):
    """A Linear on the first features it receives, producing its first `active_channels(out, width)` outputs
    (all of them with `slim_out` False: heads whose output size is fixed)."""

    width: float = 1.0
    slim_out: bool = True

    def forward(self, x: Tensor) -> Tensor:
        cin = x.shape[-1]
        if cin > self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {cin} features, the layer at most {self.in_features}")
        cout = active_channels(self.out_features, self.width) if self.slim_out else self.out_features
        if cin == self.in_features and cout == self.out_features:
            self.active_params = sum(p.numel() for p in self.parameters(recurse=False))
            return super().forward(x)
        weight = self.weight[:cout, :cin]
        bias = None if self.bias is None else self.bias[:cout]
        self.active_params = weight.numel() + (0 if bias is None else bias.numel())
        return F.linear(x, weight, bias)


class _SlimmableBatchNorm:
    """BatchNorm over the first channels it receives; the running statistics of those channels are updated in
    place (a prefix of the shared buffers), so a width's statistics are only meaningful after `recalibrate_bn`."""

    width: float = 1.0

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        k = x.shape[1]
        if k > self.num_features:
            raise ValueError(f"{type(self).__name__}: input has {k} channels, the layer at most {self.num_features}")
        self.active_params = 0 if self.weight is None else 2 * k
        if k == self.num_features:
            return super().forward(x)  # type: ignore[misc]
        self._check_input_dim(x)
        average = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            average = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean[:k] if track and self.running_mean is not None else None,
            self.running_var[:k] if track and self.running_var is not None else None,
            None if self.weight is None else self.weight[:k], None if self.bias is None else self.bias[:k],
            use_batch, average, self.eps,
        )


class SlimmableBatchNorm2d(_SlimmableBatchNorm, nn.BatchNorm2d):
    pass


class SlimmableBatchNorm1d(_SlimmableBatchNorm, nn.BatchNorm1d):
    pass


class SlimmableAttention(nn.MultiheadAttention):
    """Self-attention running its first `max(1, round(heads x width))` heads (queries, keys and values of those
    heads; the output projection reads only their columns). All heads: `nn.MultiheadAttention` itself."""

    width: float = 1.0

    def active_heads(self) -> int:
        return max(1, min(self.num_heads, math.floor(self.num_heads * self.width + 0.5)))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False,
                **kwargs: Any) -> tuple[Tensor, None]:
        heads = self.active_heads()
        e, hd = self.embed_dim, self.head_dim
        if heads == self.num_heads:
            self.active_params = sum(p.numel() for p in self.parameters())
            return super().forward(query, key, value, need_weights=need_weights, **kwargs)
        if not (self.batch_first and query is key is value) or kwargs:
            raise ValueError("SlimmableAttention below full width supports only batch-first self-attention")
        rows = torch.cat([torch.arange(heads * hd, device=query.device) + i * e for i in range(3)])
        w_qkv, b_qkv = self.in_proj_weight[rows], self.in_proj_bias[rows]
        w_out = self.out_proj.weight[:, : heads * hd]
        self.active_params = w_qkv.numel() + b_qkv.numel() + w_out.numel() + self.out_proj.bias.numel()
        b, t, _ = query.shape
        q, k, v = F.linear(query, w_qkv, b_qkv).reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # [B, heads, T, hd]
        return F.linear(out.transpose(1, 2).reshape(b, t, heads * hd), w_out, self.out_proj.bias), None


def slim_twin(module: nn.Module, slim_out: bool) -> nn.Module | None:
    """A slimmable module sharing `module`'s parameters and buffers (same names), or None to leave it as is."""
    kind = type(module)
    if kind is nn.Conv2d:
        twin = SlimmableConv2d.__new__(SlimmableConv2d)
    elif kind is nn.Linear:
        twin = SlimmableLinear.__new__(SlimmableLinear)
    elif kind is nn.BatchNorm2d:
        twin = SlimmableBatchNorm2d.__new__(SlimmableBatchNorm2d)
    elif kind is nn.BatchNorm1d:
        twin = SlimmableBatchNorm1d.__new__(SlimmableBatchNorm1d)
    elif kind is nn.MultiheadAttention:
        twin = SlimmableAttention.__new__(SlimmableAttention)
    else:
        return None
    twin.__dict__.update(module.__dict__)  # the same parameter, buffer and submodule dicts: nothing is copied
    if hasattr(twin, "slim_out"):
        twin.slim_out = slim_out
    return twin


def slimmify(module: nn.Module, fixed_out: Iterable[str] = (), slim_linear: bool = True) -> nn.Module:
    """Swap, in place, every Conv2d, Linear, BatchNorm1d/2d and MultiheadAttention of `module` for its slimmable
    twin (same tensors, same names); the layers named in `fixed_out` keep their full output.

    Raises:
        ValueError: `module` has a normalisation over channels other than BatchNorm (it could not slim).
    """
    fixed = set(fixed_out)
    for name, sub in list(module.named_modules()):
        for child_name, child in list(sub.named_children()):
            full_name = f"{name}.{child_name}" if name else child_name
            if isinstance(child, (nn.GroupNorm, nn.InstanceNorm2d)) or (
                    isinstance(child, _BatchNorm) and type(child) not in (nn.BatchNorm1d, nn.BatchNorm2d)):
                raise ValueError(f"{full_name}: {type(child).__name__} cannot slim; slimmable backbones need "
                                 "BatchNorm (leave norm_layer unset)")
            if isinstance(child, nn.Linear) and not slim_linear:
                continue
            twin = slim_twin(child, slim_out=full_name not in fixed)
            if twin is not None:
                setattr(sub, child_name, twin)
    known = sum(1 for m in module.modules() if hasattr(m, "width") and isinstance(m, _SLIMMABLE))
    if known == 0:
        raise ValueError(f"{type(module).__name__}: no layer could slim")
    module.slimmable = True
    return module


_SLIMMABLE = (SlimmableConv2d, SlimmableLinear, _SlimmableBatchNorm, SlimmableAttention)


def is_slimmable(module: nn.Module) -> bool:
    return bool(getattr(module, "slimmable", False))


def set_width(module: nn.Module, width: float) -> None:
    """Run every slimmable layer under `module` at `width` (in [0.25, 1.0]) from now on."""
    width = check_width(width)
    for m in module.modules():
        if isinstance(m, _SLIMMABLE):
            m.width = width
    if is_slimmable(module):
        module.current_width = width


def feature_dim(module: nn.Module, width: float) -> int:
    """Length of the feature vector a slimmable backbone returns at `width`."""
    full = module.out_dim
    return active_channels(full, check_width(width)) if getattr(module, "features_slim", False) else full


@torch.no_grad()
def recalibrate_bn(model: nn.Module, width: float, batches: Iterable[Tensor], *, forward=None) -> int:
    """The US-Net BN calibration: set `width`, reset every BatchNorm's running statistics, then forward `batches`
    with the BNs in train mode and a cumulative average (momentum None), no gradient. Every other module runs in
    eval mode; afterwards every module's mode and momentum are restored. Only running statistics (and the BNs'
    batch counters) change. Returns the number of batches seen.

    `forward(model, batch)` replaces `model(batch)` (e.g. a method's backbone call).
    """
    set_width(model, width)
    modes = {m: m.training for m in model.modules()}
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in bns]
    seen = 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for batch in batches:
            (forward or (lambda mod, x: mod(x)))(model, batch)
            seen += 1
    finally:
        for m, training in modes.items():
            m.training = training
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    if bns and seen == 0:
        raise ValueError("recalibrate_bn: no calibration batch was given")
    return seen


@torch.no_grad()
def width_cost(model: nn.Module, width: float, image_size: int) -> dict[str, int]:
    """Parameters and multiply-accumulates of one `[1, 3, image_size, image_size]` image at `width`.

    MACs are `torch.utils.flop_counter.FlopCounterMode`'s FLOPs / 2. Parameters: the slices the slimmable layers
    used in that forward, plus every parameter of the other modules (LayerNorms, tokens, embeddings).
    """
    set_width(model, width)
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    try:
        model.eval()  # batch of one: BN on running statistics
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for m, training in modes.items():
            m.training = training
    params = 0
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, SlimmableAttention)}
    for m in model.modules():
        if isinstance(m, _SLIMMABLE):
            params += m.active_params
        elif id(m) not in inside_attention:  # an attention's output projection is in its own count
            params += sum(p.numel() for p in m.parameters(recurse=False))
    return {"params": int(params), "macs": int(counter.get_total_flops() // 2)}


class _WidthMixin:
    """`forward(x, width=None)`: a width given at call time is set first (kept for later calls)."""

    slimmable = True
    features_slim = True
    current_width = 1.0

    def forward(self, x: Tensor, width: float | None = None) -> Tensor:  # type: ignore[override]
        if width is not None:
            set_width(self, width)  # type: ignore[arg-type]
        return super().forward(x)  # type: ignore[misc]


class SlimmableResNet(_WidthMixin, ResNet):
    """ResNet whose channels slim; features `[B, active_channels(out_dim, width)]`."""


class SlimmableMobileNetV2(_WidthMixin, MobileNetV2):
    """MobileNetV2 whose channels slim except the last 1x1 layer's 1280 (features `[B, out_dim]` at every width)."""

    features_slim = False


class SlimmableViT(_WidthMixin, ViT):
    """ViT whose attention heads and MLP hidden units slim; features `[B, 192]` at every width."""

    features_slim = False


def _retype(net: nn.Module, cls: type) -> nn.Module:
    net.__class__ = cls  # the plain network's modules and init, with the width-aware forward
    return net


def slimmable_resnet18(width: int = 64, cifar_stem: bool = False, norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-18 whose channels slim (`resnet18` at width 1.0)."""
    return slimmify(_retype(resnet18(width, cifar_stem, norm_layer), SlimmableResNet))


def slimmable_resnet50(width: int = 64, cifar_stem: bool = False, norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-50 whose channels slim (`resnet50` at width 1.0)."""
    return slimmify(_retype(resnet50(width, cifar_stem, norm_layer), SlimmableResNet))


def slimmable_mobilenet_v2(width_mult: float = 1.0, cifar_stem: bool = False,
                           norm_layer: NormLayer | None = None) -> MobileNetV2:
    """MobileNetV2 whose channels slim (`mobilenet_v2` at width 1.0); the last layer keeps its outputs."""
    net = _retype(mobilenet_v2(width_mult, cifar_stem, norm_layer), SlimmableMobileNetV2)
    last = len(net.features) - 1
    return slimmify(net, fixed_out={f"features.{last}.0"})


def slimmable_vit_tiny(image_size: int = 224, patch_size: int | None = None,
                       norm_layer: NormLayer | None = None) -> ViT:
    """ViT-Tiny whose heads and MLP hidden units slim (`vit_tiny` at width 1.0)."""
    net = _retype(vit_tiny(image_size, patch_size, norm_layer), SlimmableViT)
    # Slim the attention and the MLP's hidden layer; the MLP's second Linear and the patch embedding keep the
    # embedding dimension.
    for block in net.encoder.layers:
        block.self_attention = slim_twin(block.self_attention, slim_out=True)
        block.mlp[0] = slim_twin(block.mlp[0], slim_out=True)
        block.mlp[3] = slim_twin(block.mlp[3], slim_out=False)
    net.slimmable = True
    return net


__all__ = [
    "MAX_WIDTH", "MIN_WIDTH", "SlimmableAttention", "SlimmableBatchNorm1d", "SlimmableBatchNorm2d",
    "SlimmableConv2d", "SlimmableLinear", "SlimmableMobileNetV2", "SlimmableResNet", "SlimmableViT",
    "active_channels", "check_width", "feature_dim", "is_slimmable", "recalibrate_bn", "set_width", "slim_twin",
    "slimmify",
    "slimmable_mobilenet_v2", "slimmable_resnet18", "slimmable_resnet50", "slimmable_vit_tiny", "width_cost",
]
