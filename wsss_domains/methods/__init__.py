"""WSSS methods behind one registry."""

from wsss_domains.methods import refinement as _refinement  # noqa: F401  (registers refined-CAM methods)
from wsss_domains.methods.base import Method
from wsss_domains.methods.registry import create_method, list_methods, method_class, register_method

__all__ = ["Method", "create_method", "list_methods", "method_class", "register_method"]
