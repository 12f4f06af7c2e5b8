"""Deployment: apply bnnpan's methods to whole scenes (``bnnpan fuse``) and ship trained networks.

:mod:`bnnpan.deploy.fuse` fuses a scene of any size tile by tile into a Cloud-Optimized GeoTIFF.
"""
