"""Structural re-parameterization: train multi-branch blocks, deploy one equivalent convolution.

* fusion math (:mod:`lightning_nd.reparam.fusion`): BN folding, kernel padding, identity / average-pool kernels,
  the ``1x1 -> k x k`` merge;
* blocks: :class:`ACBlock` (ACNet), :class:`DiverseBranchBlock` (DBB), :class:`RepVGGBlock`, each with an in-place
  ``reparameterize()`` and a ``deploy=True`` constructor flag;
* models: :class:`RepVGG` and ``repvgg_a0`` ... ``repvgg_b3``, registered in timm as ``lnd_repvgg_a0`` ...;
* :func:`find_conv_bn_pairs` (conv -> BN pairs from the traced dataflow), :func:`convert_model` (those pairs -> blocks), :func:`reparameterize_model` (timm's protocol, root
  included, each module once), :func:`save_deploy` / :func:`load_deploy`.

The Lightning side is ``lightning_nd.callbacks.ReparamConvert`` and ``ReparamFuse``.
"""

from lightning_nd.reparam.acb import ACBlock
from lightning_nd.reparam.base import ConvBN, ReparamBlock
from lightning_nd.reparam.convert import Conversion, convert_model, convert_model_with_report
from lightning_nd.reparam.dbb import BNAndPad, DiverseBranchBlock, IdentityBasedConv1x1
from lightning_nd.reparam.deploy_io import load_deploy, save_deploy
from lightning_nd.reparam.fusion import (
    avgpool_kernel,
    bn_pad_values,
    bn_scale_shift,
    center_kernel,
    fold_bn,
    fuse_conv_bn,
    identity_kernel,
    merge_1x1_kxk,
)
from lightning_nd.reparam.pairs import ConvBNPair, PairSearch, SkippedBN, find_conv_bn_pairs
from lightning_nd.reparam.protocol import (
    ReparamStats,
    count_batchnorms,
    fold_conv_bn_pairs,
    reparameterize_model,
    reparameterize_with_stats,
)
from lightning_nd.reparam.repvgg import (
    RepVGG,
    register_timm_models,
    repvgg_a0,
    repvgg_a1,
    repvgg_a2,
    repvgg_b0,
    repvgg_b1,
    repvgg_b2,
    repvgg_b3,
)
from lightning_nd.reparam.repvgg_block import RepVGGBlock

TIMM_NAMES = register_timm_models()

__all__ = [
    "ACBlock",
    "BNAndPad",
    "Conversion",
    "ConvBN",
    "ConvBNPair",
    "DiverseBranchBlock",
    "IdentityBasedConv1x1",
    "PairSearch",
    "RepVGG",
    "RepVGGBlock",
    "ReparamBlock",
    "ReparamStats",
    "SkippedBN",
    "TIMM_NAMES",
    "avgpool_kernel",
    "bn_pad_values",
    "bn_scale_shift",
    "center_kernel",
    "convert_model",
    "convert_model_with_report",
    "count_batchnorms",
    "find_conv_bn_pairs",
    "fold_bn",
    "fold_conv_bn_pairs",
    "fuse_conv_bn",
    "identity_kernel",
    "load_deploy",
    "merge_1x1_kxk",
    "register_timm_models",
    "reparameterize_model",
    "reparameterize_with_stats",
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_a2",
    "repvgg_b0",
    "repvgg_b1",
    "repvgg_b2",
    "repvgg_b3",
    "save_deploy",
]
