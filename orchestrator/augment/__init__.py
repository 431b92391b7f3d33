"""Differentiable image augmentation for data-efficient GAN training: ADA's pipeline and DiffAugment."""
