"""gan_dist: distributed GAN training on Ray Train."""

__version__ = "0.1.0"
