"""The domain-transfer matrix (``wsss-domains bench``): methods x domains, scored against plain CAM."""

from wsss_domains.transfer_matrix.matrix import MatrixSettings, run_matrix, trains_own_model
from wsss_domains.transfer_matrix.presets import DEFAULT_PRESETS, CellPreset

__all__ = ["DEFAULT_PRESETS", "CellPreset", "MatrixSettings", "run_matrix", "trains_own_model"]
