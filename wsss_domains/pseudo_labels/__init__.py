"""Pseudo-label assembly, writing and overlays."""
