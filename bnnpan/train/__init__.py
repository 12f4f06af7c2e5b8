"""One training loop for every method (bnnpan.train.loop)."""
