"""Histopathology domain plugin (entry point ``histo``)."""

from wsss_adapters.histo.plugin import HistoDomain

__all__ = ["HistoDomain"]
