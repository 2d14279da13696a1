"""Reference natural-image plugins: PASCAL VOC 2012 (``voc``) and MS COCO (``coco``)."""

from wsss_adapters.natural.plugins import CocoDomain, VocDomain

__all__ = ["CocoDomain", "VocDomain"]
