"""Bilinear ``grid_sample`` whose backward can itself be differentiated (for R1 on augmented reals).

ADA (Karras et al. 2020) computes the R1 penalty on augmented real images, so the gradient of D with respect to
the *un-augmented* image runs backwards through the geometric warp and is then differentiated again with
respect to D's parameters. The official code therefore wraps ``grid_sample`` in a pair of autograd functions
(``torch_utils/ops/grid_sample_gradfix.py``). Recent PyTorch releases differentiate ``grid_sample``'s backward
natively, but this pair keeps the contract explicit and cheap: it only produces the input gradient (the
sampling grid is a constant of the augmentation) and only the second-order term that R1 needs.

The key fact: for a fixed grid, bilinear sampling is linear in the image, ``y = A x``. Its backward is
``gx = A^T gy`` (again linear, independent of ``x``), and the derivative of that backward with respect to
``gy`` is ``A`` applied to the incoming gradient, i.e. the forward sampling once more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BILINEAR, _ZEROS, _ALIGN_CORNERS = 0, 0, False


def grid_sample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)`` with a
    backward that supports double backward with respect to ``images``. A grid that requires grad falls back
    to torch's own op (the augmentation never differentiates through its random transform)."""
    if grid.requires_grad:
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=_ALIGN_CORNERS)
    return _GridSample.apply(images, grid)


class _GridSample(torch.autograd.Function):
    """``y = A(grid) x``; backward goes through :class:`_GridSampleBackward` so it stays differentiable."""

    @staticmethod
    def forward(ctx, images, grid):
        ctx.save_for_backward(images, grid)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=_ALIGN_CORNERS)

    @staticmethod
    def backward(ctx, grad_output):
        images, grid = ctx.saved_tensors
        return _GridSampleBackward.apply(grad_output, images, grid), None


class _GridSampleBackward(torch.autograd.Function):
    """``gx = A(grid)^T gy``. Linear in ``gy`` and independent of ``x``, so its own backward is ``A`` again."""

    @staticmethod
    def forward(ctx, grad_output, images, grid):
        ctx.save_for_backward(grid)
        grad_images, _ = torch.ops.aten.grid_sampler_2d_backward(
            grad_output, images, grid, _BILINEAR, _ZEROS, _ALIGN_CORNERS, [True, False]
        )
        return grad_images

    @staticmethod
    def backward(ctx, grad2_images):
        (grid,) = ctx.saved_tensors
        grad2_output = _GridSample.apply(grad2_images, grid) if ctx.needs_input_grad[0] else None
        return grad2_output, None, None
