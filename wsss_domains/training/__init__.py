"""Classifier training from image-level labels."""
