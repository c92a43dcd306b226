"""Synthetic contrast-enhanced chest CT studies (CTPA) with pulmonary emboli, for tests, demo, training.

numpy and pydicom only. ``generate_study`` draws and renders one patient from a seed;
``write_study`` writes its CT series (and companion series); ``write_rsna_dataset`` writes many
studies in the RSNA-STR PE layout with sparse pixel masks.
"""

from node.phantom.dataset import write_rsna_dataset
from node.phantom.spec import HU_RANGE, Structure
from node.phantom.study import COMPANIONS, PhantomOptions, PhantomStudy, generate_study, write_study
from node.phantom.writer import ORDERS, TRANSFER_SYNTAXES

__all__ = [
    "COMPANIONS", "HU_RANGE", "ORDERS", "TRANSFER_SYNTAXES", "PhantomOptions", "PhantomStudy", "Structure",
    "generate_study", "write_rsna_dataset", "write_study",
]
