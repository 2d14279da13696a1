"""Remote-sensing domain plugin (entry point ``remote-sensing``) and windowed raster tiles."""

from wsss_adapters.remote_sensing.datasets import RasterTiles
from wsss_adapters.remote_sensing.plugin import RemoteSensingDomain

from wsss_domains.data.windows import TileWindow, iter_windows

__all__ = ["RasterTiles", "RemoteSensingDomain", "TileWindow", "iter_windows"]
