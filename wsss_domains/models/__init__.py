"""Backbones, pretrained weights and the CAM classifier."""
