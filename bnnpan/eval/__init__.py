"""Evaluation: reduced- and full-resolution quality indices, and the evaluate stage."""
