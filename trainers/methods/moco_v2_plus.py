"""MoCo-v2+ (Huang, Kong, Zhang, 2022, "Revisiting the Critical Factors of Augmentation-Invariant Representation
Learning"): MoCo-v2 brought to BYOL's configuration for a fair comparison.

Against MoCo-v2 it changes only the model configuration: the loss is symmetric (both views are queries, each
against the other's key), the projector is BYOL's (Linear 4096-BN-ReLU-Linear 256), the online branch adds a
BYOL predictor (Linear 4096-BN-ReLU-Linear 256; the key encoder has none), and the key encoder's momentum rises
from 0.99 to 1 on a cosine over the run. The InfoNCE loss, the temperature 0.2 and the 65536-key queue are
MoCo-v2's: this class reuses `MoCoV2`'s loss, queue and step, and only adds the predictor to the query.

Settings taken from the code release (github.com/megvii-research/revisitAIRL, exp/mocov2_plus.py): low_dim 256,
hidden_dim 4096, MLP 'byol', predictor {'online': True, 'target': False}, init_param_momentum 0.99 with
m = 1 - (1 - 0.99)(cos(pi k / K) + 1) / 2, temperature 0.2, queue_size 65536, SyncBN in both encoders, the keys
of one view drawn at random each step enqueued. Two deliberate differences: the code sums the two directions
(CE_1 + CE_2); here they are averaged (the per-image mean, so the loss and the per-sample terms are on MoCo-v2's
scale; the sum is this loss with twice the LR), and the enqueued view is drawn with a generator seeded by the
step (`enqueue_view`), identical on every rank and across a resume. Shuffle-BN is not used (the release does not
either; it uses SyncBN, the loop's `sync_bn`); see `trainers.methods.moco_v2`.

Views: the symmetric augmentation set, `views.preset: symmetric` (the default): every view crop (0.08, 1), jitter
0.8 (0.4, 0.4, 0.2, 0.1), grayscale 0.2, blur 0.5, solarize 0.2 — the release's `sym_byol_transform`. (The
release's default MoCo-v2+ experiment trains on MoCo-v2's `aug_plus` set, also symmetric: for it set
`global_scale: [0.2, 1.0]` and `global_options: {saturation: 0.4, solarize_p: 0.0}`.) Optimisation in the
release: SGD, LR 0.03 x batch / 256, momentum 0.9, weight decay 1e-4, 10 warm-up epochs then cosine, 200 epochs
(the loop's settings, not the method's).

Reference: J. Huang, X. Kong, X. Zhang, "Revisiting the Critical Factors of Augmentation-Invariant Representation
Learning", ECCV 2022, arXiv:2208.00275.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from trainers.methods.heads import mlp
from trainers.methods.moco_v2 import MoCoV2, MoCoV2Config


class MoCoV2PlusConfig(MoCoV2Config):
    """MoCo-v2+'s hyper-parameters with the critical-factors study's defaults (Huang et al., 2022)."""

    proj_hidden: int = Field(4096, ge=1, description="hidden width of the projector MLP (4096 in the paper: BYOL's)")
    proj_out: int = Field(256, ge=1, description="size of the keys, queries and predictions (256 in the paper)")
    proj_bn: bool = Field(True, description="BatchNorm in the projector's hidden layer (True in the paper: BYOL's)")
    pred_hidden: int = Field(
        4096, ge=1, description="hidden width of the online predictor MLP (4096 in the paper: BYOL's predictor)",
    )
    temperature: float = Field(0.2, gt=0, allow_inf_nan=False, description="InfoNCE temperature (0.2 in the paper)")
    queue_size: int = Field(
        65536, ge=1, description="number of negative keys in the queue (65536 in the paper); any size works",
    )
    base_momentum: float = Field(
        0.99, ge=0, le=1, allow_inf_nan=False,
        description="key-encoder EMA momentum at the start of the run (0.99 in the paper); it rises to "
                    "final_momentum on a cosine over the run",
    )
    final_momentum: float = Field(
        1.0, ge=0, le=1, allow_inf_nan=False,
        description="key-encoder EMA momentum at the end of the run (1.0 in the paper: the key encoder freezes)",
    )
    symmetric: bool = Field(
        True, description="average the loss of both directions (True in the paper, the symmetric loss)",
    )


class MoCoV2Plus(MoCoV2):
    """MoCo-v2 with the symmetric loss, BYOL's projector and predictor and a cosine momentum (Huang et al., 2022).

    Options: `MoCoV2PlusConfig`.
    """

    Config = MoCoV2PlusConfig
    name = "moco_v2_plus"
    config: MoCoV2PlusConfig

    def __init__(self, backbone: nn.Module, **options) -> None:
        super().__init__(backbone, **options)
        cfg = self.config
        self.predictor = mlp(cfg.proj_out, cfg.pred_hidden, cfg.proj_out)

    def predict(self, z: Tensor) -> Tensor:
        return self.predictor(z)


__all__ = ["MoCoV2Plus", "MoCoV2PlusConfig"]
