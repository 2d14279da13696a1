"""Driving domain plugin: Cityscapes and CamVid loaders, crop labels, category mIoU."""

from wsss_adapters.driving.plugin import DrivingDomain

__all__ = ["DrivingDomain"]
