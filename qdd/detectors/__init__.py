"""Forensic detectors, registered by short name; one logit per image, > 0 means fake.

Every detector module is imported here, so an import error surfaces as itself rather
than as "unknown detector".
"""

from qdd.detectors import (  # noqa: F401  (registration)
    aeroblade,
    bfree,
    clipd,
    commfor,
    corvi,
    npr,
    rigid,
    rine,
    spai,
    univfd,
)
from qdd.detectors.base import Detector
from qdd.detectors.registry import available, build_detector, detector_class
from qdd.detectors.weights import apply_state, load_detector, read_state

__all__ = [
    "Detector",
    "apply_state",
    "available",
    "build_detector",
    "detector_class",
    "load_detector",
    "read_state",
]
