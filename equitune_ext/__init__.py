"""equitune_ext: fused equi-tuning ops for PyTorch (C++, CUDA and Triton kernels).

    M_G(x) = (1/|G|) Σ_g Γ_Y(g)⁻¹ M(Γ_X(g) x)

``group_transform`` builds the |G|·B batch of transformed inputs in one pass,
``group_average`` undoes the transforms and averages in one pass.
"""
from . import reference
from .groups import IMAGE_GROUPS, VOLUME_GROUPS, ImageGroup, VolumeGroup, get_image_group
from .conv import EquiAvgPool2d, EquiConv, EquiConvTranspose, EquiMaxPool2d
from .convert import convert_convs, equivariance_report
from .lm import EquiLM
from .seq2seq import EquiSeq2Seq
from .nn import EquiTuned, check_equivariance, equi_average, sample_elements
from .token_groups import TokenGroup
from .ops import available_backends, build_info, get_backend, group_average, group_transform, use_backend

__all__ = [
    "EquiConv",
    "EquiConvTranspose",
    "EquiMaxPool2d",
    "EquiAvgPool2d",
    "EquiLM",
    "EquiSeq2Seq",
    "convert_convs",
    "equivariance_report",
    "EquiTuned",
    "check_equivariance",
    "equi_average",
    "sample_elements",
    "IMAGE_GROUPS",
    "ImageGroup",
    "VOLUME_GROUPS",
    "VolumeGroup",
    "TokenGroup",
    "available_backends",
    "build_info",
    "get_backend",
    "get_image_group",
    "group_average",
    "group_transform",
    "reference",
    "use_backend",
]
__version__ = "0.1.0"
