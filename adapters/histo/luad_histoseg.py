"""LUAD-HistoSeg (Han et al., MedIA 2022): lung adenocarcinoma, four tissue classes.

Training names are ``<patient>-<x>-<y>-[a b c d].png`` with a, b, c, d = TE, NEC, LYM, TAS (the
order of the release's Readme and of its mask palette). Mask id 4 is white background / exclude.
"""

from __future__ import annotations

import re

from wsss_adapters.histo.tissue_layout import TissueLayout

from wsss_domains.domains.contract import BackgroundMode, LabelSpace

LABEL_SPACE = LabelSpace(
    classes=("tumor_epithelium", "necrosis", "lymphocyte", "tumor_stroma"),
    palette=((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0)),
    background_mode=BackgroundMode.EXCLUDE,
)
LAYOUT = TissueLayout(
    name="luad-histoseg",
    label_space=LABEL_SPACE,
    train_name=re.compile(r"-\[[01] [01] [01] [01]\]\.\w+$"),
    description="LUAD-HistoSeg: lung adenocarcinoma TE / NEC / LYM / TAS, WSSS-Tissue layout",
)
SPEC = LAYOUT.spec()
