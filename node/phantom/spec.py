"""What the synthetic CTPA phantom promises: structure codes and their HU ranges.

The generator draws its per-study values inside these ranges and the tests measure the written
images against them, so the specification lives in one place.
"""

from __future__ import annotations

from enum import IntEnum


class Structure(IntEnum):
    """Label codes of the structure map that comes with every rendered volume."""

    AIR = 0
    SOFT_TISSUE = 1
    FAT = 2
    LUNG = 3
    BONE = 4
    MYOCARDIUM = 5
    HEART_BLOOD = 6
    AORTA = 7
    SUPERIOR_VENA_CAVA = 8
    PULMONARY_ARTERY = 9
    PULMONARY_VEIN = 10
    AIRWAY = 11
    LYMPH_NODE = 12
    EMBOLUS = 13
    FLOW_ARTEFACT = 14
    LIVER = 15
    TABLE = 16


#: Hounsfield units each structure's core is drawn from (contrast-enhanced series).
HU_RANGE: dict[Structure, tuple[float, float]] = {
    Structure.AIR: (-1000.0, -1000.0),
    Structure.SOFT_TISSUE: (30.0, 60.0),
    Structure.FAT: (-110.0, -80.0),
    Structure.LUNG: (-900.0, -800.0),
    Structure.PULMONARY_ARTERY: (250.0, 450.0),
    Structure.EMBOLUS: (20.0, 70.0),
    Structure.PULMONARY_VEIN: (100.0, 200.0),
    Structure.AORTA: (150.0, 400.0),
    Structure.SUPERIOR_VENA_CAVA: (400.0, 2000.0),
    Structure.LYMPH_NODE: (30.0, 60.0),
    Structure.LIVER: (50.0, 70.0),
    Structure.MYOCARDIUM: (80.0, 120.0),
    # Mixing of unopacified blood: lower than the artery, always well above an embolus.
    Structure.FLOW_ARTEFACT: (120.0, 300.0),
}

#: Unenhanced blood, used for every vascular structure of a non-contrast series.
UNENHANCED_BLOOD_HU = 40.0

#: Artery generations of the pulmonary tree, by the name used in labels and the RSNA columns.
ARTERY_LEVELS = {0: "trunk", 1: "main", 2: "lobar", 3: "segmental", 4: "subsegmental"}

#: Embolus location classes and the artery levels they may sit in.
EMBOLUS_LEVELS = {"central": (0, 1), "lobar": (2,), "segmental": (3,), "subsegmental": (4,)}


def most_central_level(emboli: list[dict]) -> str | None:
    """The most central EMBOLUS_LEVELS class among a study's emboli (``phantom.json``); None for none."""
    present = {e["level"] for e in emboli}
    return next((lv for lv in EMBOLUS_LEVELS if lv in present), None)


#: The levels of the classic model (which never draws subsegmental emboli).
CLASSIC_LEVELS = ("central", "lobar", "segmental")
