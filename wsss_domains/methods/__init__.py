"""WSSS methods behind one registry."""

from wsss_domains.methods import cam_fusion as _cam_fusion  # noqa: F401  (registers cam-fusion)
from wsss_domains.methods import cam_proto as _cam_proto  # noqa: F401  (registers cam-proto)
from wsss_domains.methods import clims as _clims  # noqa: F401  (registers clims)
from wsss_domains.methods import clip_methods as _clip_methods  # noqa: F401  (registers clip-es, clip-es-learned)
from wsss_domains.methods import cpn as _cpn  # noqa: F401  (registers cpn)
from wsss_domains.methods import dupl as _dupl  # noqa: F401  (training-time methods register on import)
from wsss_domains.methods import label_probe as _label_probe  # noqa: F401  (registers label-probe)
from wsss_domains.methods import lpcam as _lpcam  # noqa: F401  (registers lpcam)
from wsss_domains.methods import ppc as _ppc  # noqa: F401
from wsss_domains.methods import refinement as _refinement  # noqa: F401  (registers refined-CAM methods)
from wsss_domains.methods import s2c as _s2c  # noqa: F401  (registers s2c)
from wsss_domains.methods import sam_proto as _sam_proto  # noqa: F401  (registers sam-proto)
from wsss_domains.methods import seam as _seam  # noqa: F401
from wsss_domains.methods import seed_probe as _seed_probe  # noqa: F401  (registers seed-probe)
from wsss_domains.methods import sepl as _sepl  # noqa: F401  (registers sepl)
from wsss_domains.methods import sipe as _sipe  # noqa: F401
from wsss_domains.methods import toco as _toco  # noqa: F401
from wsss_domains.methods.base import Method
from wsss_domains.methods.registry import create_method, list_methods, method_class, register_method

__all__ = ["Method", "create_method", "list_methods", "method_class", "register_method"]
