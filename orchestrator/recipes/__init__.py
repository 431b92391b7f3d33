"""Recipes: GAN kinds as data (see :mod:`orchestrator.recipes.recipe`); importing this registers the built-in ones."""

from orchestrator.recipes import cyclegan, noise_to_image, pix2pix, srgan  # noqa: F401
