"""Stage 2: a segmentation network trained on pseudo-labels that segments unlabelled images.

:mod:`model` builds it (segmentation-models-pytorch with a timm encoder) and saves it as a folder,
:mod:`data` pairs a split's images with their pseudo-labels, :mod:`task` and :mod:`fit` train it
on Lightning, :mod:`inference` runs it over images of any size, and :mod:`writer`, :mod:`raster` and
:mod:`slide` write its predictions for folders, rasters and whole-slide images.
"""
