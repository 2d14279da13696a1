"""wsss-domains: weakly supervised semantic segmentation from image-level labels, across domains."""

__version__ = "0.1.0"
