"""BCSS-WSSS (Han et al., MedIA 2022, from Amgad et al.'s BCSS): breast cancer, four tissue classes.

Training names are ``<BCSS image>+<index>[abcd].png`` with a, b, c, d = TUM, STR, LYM, NEC.
Mask id 4 is white background / exclude. White areas inside breast tissue are often fat, a real
tissue, so this domain does not exclude white regions of unannotated BCSS-WSSS patches (as the
dataset's authors do not either).
"""

from __future__ import annotations

import re

from wsss_adapters.histo.tissue_layout import TissueLayout

from wsss_domains.domains.contract import BackgroundMode, LabelSpace

LABEL_SPACE = LabelSpace(
    classes=("tumor", "stroma", "lymphocyte", "necrosis"),
    palette=((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255)),
    background_mode=BackgroundMode.EXCLUDE,
)
LAYOUT = TissueLayout(
    name="bcss-wsss",
    label_space=LABEL_SPACE,
    train_name=re.compile(r"\+\d+\[[01]{4}\]\.\w+$"),
    description="BCSS-WSSS: breast cancer TUM / STR / LYM / NEC, WSSS-Tissue layout",
)
SPEC = LAYOUT.spec()
