"""``ganforge import``: official pretrained networks → ganforge checkpoints, reading files as data only.

* :func:`import_stylegan2_ada`: StyleGAN2 network pickles of NVlabs' stylegan2-ada-pytorch and stylegan3
  (through the restricted unpickler of :mod:`.pickles`);
* :func:`import_biggan_pytorch`: the ``G.pth``, ``D.pth``, ``G_ema.pth`` state dicts of ajbrock/BigGAN-PyTorch.
"""

from orchestrator.tools.imports.biggan_pytorch import import_biggan_pytorch
from orchestrator.tools.imports.pickles import NetworkImportError, load_network_pickle
from orchestrator.tools.imports.stylegan2_ada import import_stylegan2_ada

__all__ = ["NetworkImportError", "import_biggan_pytorch", "import_stylegan2_ada", "load_network_pickle"]
