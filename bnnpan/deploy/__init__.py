"""Deployment: trained networks out of the pipeline (a self-describing packed file, the MLflow model registry)."""
