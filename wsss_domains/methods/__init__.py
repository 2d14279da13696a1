"""WSSS methods behind one registry (the built-in methods' modules are imported at the first lookup)."""

from wsss_domains.methods.base import Method
from wsss_domains.methods.registry import create_method, list_methods, method_class, register_method

__all__ = ["Method", "create_method", "list_methods", "method_class", "register_method"]
