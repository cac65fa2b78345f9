"""One record per component: the single source of the names, options and needs of methods, backbones, strategies.

A `Record` holds a component's name, the class or builder that makes it, its `Config` (a `ComponentConfig`:
every option with its type, bounds, default and description) and what it needs from the data and the views.
The spec's allowed names, its typed per-component options, the flattened MLflow params (defaults included) and
the error messages all come from here (see `orchestrator.spec.experiment`); `METHODS`, `BACKBONES` and `STRATEGIES` in the
component packages are read-only views of these registries.

Usage::

    from trainers.registry import METHOD_REGISTRY
    record = METHOD_REGISTRY["simclr"]
    record.defaults()                      # {"proj_hidden": 2048, "proj_out": 128, "temperature": 0.1}
    options = record.options({"temperature": 0.2})   # validated, defaults filled; ValueError on a bad option
    method = record.build(backbone, **options)

Adding a component: its module with a `Config` next to the code, then one `Record` in the list below.
"""

from __future__ import annotations

from trainers.backbones.mobilenet import MobileNetV2Config, mobilenet_v2
from trainers.backbones.resnet import ResNetConfig, resnet18, resnet34, resnet50
from trainers.backbones.slimmable import (
    slimmable_mobilenet_v2,
    slimmable_resnet18,
    slimmable_resnet50,
    slimmable_vit_tiny,
)
from trainers.backbones.vit import ViTConfig, vit_tiny
from trainers.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig
from trainers.methods.byol import BYOL, BYOLConfig
from trainers.methods.dino import DINO, DINOConfig
from trainers.methods.moco_v2 import MoCoV2, MoCoV2Config
from trainers.methods.moco_v2_plus import MoCoV2Plus, MoCoV2PlusConfig
from trainers.methods.simclr import SimCLR, SimCLRConfig
from trainers.methods.simsiam import SimSiam, SimSiamConfig
from trainers.methods.supervised import Supervised, SupervisedConfig
from trainers.methods.swav import SwAV, SwAVConfig
from trainers.methods.us3l import US3L, US3LConfig
from trainers.records import Record, Registry  # noqa: F401  (re-exported: the types live there)
from trainers.strategies.cassle import CaSSLe, CaSSLeConfig
from trainers.strategies.joint import Joint, JointConfig
from trainers.strategies.lump import Lump, LumpConfig
from trainers.strategies.mas import MAS, MASConfig
from trainers.strategies.replay import Replay, ReplayConfig
from trainers.strategies.sequential import Sequential, SequentialConfig

METHOD_REGISTRY = Registry("method", [
    Record("simclr", SimCLR, SimCLRConfig, min_global_views=2,
           summary="contrastive: NT-Xent over the global batch (Chen et al., 2020)"),
    Record("byol", BYOL, BYOLConfig, min_global_views=2,
           summary="online predictor regresses an EMA target's projection (Grill et al., 2020)"),
    Record("moco_v2", MoCoV2, MoCoV2Config, min_global_views=2, weights_local_views=True,
           summary="contrastive: InfoNCE against an EMA key encoder's key and a queue of past keys "
                   "(Chen et al., 2020)"),
    Record("moco_v2_plus", MoCoV2Plus, MoCoV2PlusConfig, min_global_views=2, weights_local_views=True,
           summary="MoCo-v2 with the symmetric loss, BYOL's heads and a cosine momentum (Huang et al., 2022)"),
    Record("barlow_twins", BarlowTwins, BarlowTwinsConfig, min_global_views=2,
           summary="cross-correlation of two views' embeddings pushed to the identity (Zbontar et al., 2021)"),
    Record("simsiam", SimSiam, SimSiamConfig, min_global_views=2,
           summary="predictor regresses the other view's stop-gradient projection (Chen & He, 2021)"),
    Record("swav", SwAV, SwAVConfig, needs_local_views=True, weights_local_views=True, min_global_views=2,
           summary="swapped prediction of Sinkhorn cluster codes over multi-crop views (Caron et al., 2020)"),
    Record("dino", DINO, DINOConfig, needs_local_views=True, weights_local_views=True, min_global_views=2,
           summary="self-distillation: student matches a centred, sharpened EMA teacher over multi-crop views "
                   "(Caron et al., 2021)"),
    Record("supervised", Supervised, SupervisedConfig, needs_labels=True, min_global_views=1,
           summary="SL baseline: linear classifier + cross-entropy on the labels (He et al., 2016)"),
    Record("us3l", US3L, US3LConfig, min_global_views=2, slimmable=True,
           summary="universally slimmable SSL: sandwich of widths, momentum-teacher InfoNCE distillation "
                   "(Cao et al., 2023); US-Net baselines as options"),
])

BACKBONE_REGISTRY = Registry("backbone", [
    Record("resnet18", resnet18, ResNetConfig, summary="ResNet-18, BasicBlocks (2, 2, 2, 2); out_dim 8 x width"),
    Record("resnet34", resnet34, ResNetConfig, summary="ResNet-34, BasicBlocks (3, 4, 6, 3); out_dim 8 x width"),
    Record("resnet50", resnet50, ResNetConfig, summary="ResNet-50, Bottlenecks (3, 4, 6, 3); out_dim 32 x width"),
    Record("mobilenet_v2", mobilenet_v2, MobileNetV2Config,
           summary="MobileNetV2, inverted residuals (torchvision); out_dim 1280 x max(1, width_mult)"),
    Record("vit_tiny", vit_tiny, ViTConfig,
           summary="ViT-Tiny: dim 192, depth 12, 3 heads (torchvision); patch from the image size; out_dim 192"),
    Record("slimmable_resnet18", slimmable_resnet18, ResNetConfig, slimmable=True,
           summary="ResNet-18 runnable at any width in [0.25, 1.0] (first k channels; US-Net); features slim"),
    Record("slimmable_resnet50", slimmable_resnet50, ResNetConfig, slimmable=True,
           summary="ResNet-50 runnable at any width in [0.25, 1.0] (first k channels; US-Net); features slim"),
    Record("slimmable_mobilenet_v2", slimmable_mobilenet_v2, MobileNetV2Config, slimmable=True,
           summary="MobileNetV2 runnable at any width in [0.25, 1.0]; the last layer's 1280 outputs stay"),
    Record("slimmable_vit_tiny", slimmable_vit_tiny, ViTConfig, slimmable=True,
           summary="ViT-Tiny whose heads and MLP hidden units slim to any width in [0.25, 1.0]; out_dim 192"),
])


def backbone_suits(method: str, backbone: str) -> bool:
    """Whether `method` can train `backbone` (a slimmable method needs a slimmable backbone)."""
    return not METHOD_REGISTRY.require(method).slimmable or BACKBONE_REGISTRY.require(backbone).slimmable


def check_backbone_for_method(method: str, backbone: str) -> None:
    """Raise a ValueError naming `backbone.name` when `method` needs a slimmable backbone and `backbone` is not
    one (the spec calls this with its `methods` keys and `backbone.name`)."""
    method_record, backbone_record = METHOD_REGISTRY.require(method), BACKBONE_REGISTRY.require(backbone)
    if not backbone_suits(method_record.name, backbone_record.name):
        slim = [r.name for r in BACKBONE_REGISTRY.values() if r.slimmable]
        raise ValueError(f"backbone.name: method {method!r} trains a slimmable network and needs a slimmable "
                         f"backbone ({', '.join(slim)}), got {backbone!r}")


STRATEGY_REGISTRY = Registry("strategy", [
    Record("sequential", Sequential, SequentialConfig, summary="ST: chunk t from chunk t-1's weights"),
    Record("joint", Joint, JointConfig, summary="JT: chunks 0..t together"),
    Record("replay", Replay, ReplayConfig, summary="aid: a buffer of past chunks' rows mixed into every batch"),
    Record("mas", MAS, MASConfig,
           summary="aid: penalty on moving the weights the past representation depends on (Aljundi et al., 2018)"),
    Record("lump", Lump, LumpConfig,
           summary="aid: mixup of every batch with a buffer of past rows (LUMP, Madaan et al., 2022); sequential only"),
    Record("cassle", CaSSLe, CaSSLeConfig,
           summary="aid: a predictor maps the representation to the last chunk's frozen one, under the method's own "
                   "loss (Fini et al., 2022); sequential base only"),
])

__all__ = ["BACKBONE_REGISTRY", "METHOD_REGISTRY", "Record", "Registry", "STRATEGY_REGISTRY", "backbone_suits",
           "check_backbone_for_method"]
