"""Keras models, losses and metrics: 2D U-Net, 3D U-Net, Conv3D patch classifier."""

from medseg.models.compile import (
    compile_patch_classifier,
    compile_segmentation_model,
    make_optimizer,
    optimizer_display_name,
)
from medseg.models.conv3d import build_patch_classifier, build_unet3d
from medseg.models.losses import (
    bce_dice_loss,
    binary_crossentropy_mean,
    dice,
    dice_coefficient,
    dice_loss,
    get_loss,
    iou,
    iou_coefficient,
    loss_display_name,
)
from medseg.models.unet2d import build_unet2d, conv_block

__all__ = [
    "bce_dice_loss",
    "binary_crossentropy_mean",
    "build_patch_classifier",
    "build_unet2d",
    "build_unet3d",
    "compile_patch_classifier",
    "compile_segmentation_model",
    "conv_block",
    "dice",
    "dice_coefficient",
    "dice_loss",
    "get_loss",
    "iou",
    "iou_coefficient",
    "loss_display_name",
    "make_optimizer",
    "optimizer_display_name",
]
