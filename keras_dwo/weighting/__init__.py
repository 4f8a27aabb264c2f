"""Weighting methods and their identifiers.

`get(identifier)` resolves a string, a config dict or an instance, like
`keras.losses.get`.
"""

import keras

from keras_dwo.weighting.aligned_mtl import AlignedMTL
from keras_dwo.weighting.base import GradientWeighting
from keras_dwo.weighting.base import LossWeighting
from keras_dwo.weighting.cagrad import CAGrad
from keras_dwo.weighting.conflict_free import ConFIG
from keras_dwo.weighting.db_mtl import DBMTL
from keras_dwo.weighting.dualproj import DualProj
from keras_dwo.weighting.excess_mtl import ExcessMTL
from keras_dwo.weighting.fairgrad import FairGrad
from keras_dwo.weighting.famo import FAMO
from keras_dwo.weighting.gls import GLS
from keras_dwo.weighting.graddrop import GradDrop
from keras_dwo.weighting.gradnorm import GradNorm
from keras_dwo.weighting.gradvac import GradVac
from keras_dwo.weighting.imtl_g import IMTLG
from keras_dwo.weighting.imtl_l import IMTLL
from keras_dwo.weighting.mgda import MGDA
from keras_dwo.weighting.moco import MoCo
from keras_dwo.weighting.modo import MoDo
from keras_dwo.weighting.nash_mtl import NashMTL
from keras_dwo.weighting.pcgrad import PCGrad
from keras_dwo.weighting.rlw import RLW
from keras_dwo.weighting.scale_invariant import ScaleInvariant
from keras_dwo.weighting.sdmgrad import SDMGrad
from keras_dwo.weighting.static import Static
from keras_dwo.weighting.stch import STCH
from keras_dwo.weighting.uncertainty import Uncertainty
from keras_dwo.weighting.upgrad import UPGrad

IDENTIFIERS = {
    "equal": Static,
    "static": Static,
    "uncertainty": Uncertainty,
    "rlw": RLW,
    "gls": GLS,
    "scale_invariant": ScaleInvariant,
    "log": ScaleInvariant,
    "imtl_l": IMTLL,
    "famo": FAMO,
    "stch": STCH,
    "gradnorm": GradNorm,
    "mgda": MGDA,
    "mgda_ub": MGDA,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "imtl_g": IMTLG,
    "graddrop": GradDrop,
    "gradvac": GradVac,
    "nash_mtl": NashMTL,
    "aligned_mtl": AlignedMTL,
    "upgrad": UPGrad,
    "dualproj": DualProj,
    "config": ConFIG,
    "fairgrad": FairGrad,
    "db_mtl": DBMTL,
    "moco": MoCo,
    "excess_mtl": ExcessMTL,
    "modo": MoDo,
    "sdmgrad": SDMGrad,
}

# Identifiers that name a configuration of a class, not the class alone.
_IDENTIFIER_ARGUMENTS = {"mgda_ub": {"wrt": "representation"}}


def get(identifier):
    """Returns a new weighting method for an identifier.

    Args:
        identifier: A string from `IDENTIFIERS` (case-insensitive), a dict
            `{"class_name": ..., "config": ...}` as `keras.saving` writes it,
            or a `LossWeighting` instance (returned as is).

    Returns:
        A `LossWeighting` instance.
    """
    if isinstance(identifier, LossWeighting):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in IDENTIFIERS:
            raise ValueError(
                f"Unknown weighting {identifier!r}; known identifiers: "
                f"{sorted(IDENTIFIERS)}."
            )
        return IDENTIFIERS[key](**_IDENTIFIER_ARGUMENTS.get(key, {}))
    if isinstance(identifier, dict):
        method = keras.saving.deserialize_keras_object(identifier)
        if isinstance(method, LossWeighting):
            return method
    raise ValueError(
        "`weighting` must be a string identifier, a serialized weighting dict "
        f"or a keras_dwo.weighting instance; received {identifier!r}."
    )


__all__ = [
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DBMTL",
    "DualProj",
    "ExcessMTL",
    "FAMO",
    "FairGrad",
    "get",
    "GLS",
    "GradDrop",
    "GradientWeighting",
    "GradNorm",
    "GradVac",
    "IDENTIFIERS",
    "IMTLG",
    "IMTLL",
    "LossWeighting",
    "MGDA",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "RLW",
    "STCH",
    "ScaleInvariant",
    "SDMGrad",
    "Static",
    "Uncertainty",
    "UPGrad",
]
