"""Deployment: apply bnnpan's methods to whole scenes and ship trained networks.

* :mod:`bnnpan.deploy.fuse`: ``bnnpan fuse``, a scene of any size fused tile by tile into a Cloud-Optimized GeoTIFF;
* :mod:`bnnpan.deploy.export`: ``bnnpan export``, a trained network as a self-describing packed 1-bit safetensors
  file, registered in the MLflow model registry.
"""
