"""Recipes: GAN kinds as data (see :mod:`orchestrator.recipes.recipe`); importing this registers the built-in ones."""

from orchestrator.recipes import noise_to_image  # noqa: F401
