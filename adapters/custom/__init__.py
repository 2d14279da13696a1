"""Custom domain plugin: datasets in the generic folder format (docs/folder-format.md)."""

from wsss_adapters.custom.plugin import CustomDomain

__all__ = ["CustomDomain"]
