"""``ganforge import``: official StyleGAN2 network pickles and BigGAN-PyTorch state dicts → ganforge checkpoints.

The pickles are written here in the official format (``torch_utils.persistence`` records, ``dnnlib.util.EasyDict``
keywords, plain ``pickle.dump``), with stand-in ``torch_utils`` and ``dnnlib`` modules whose reconstruct function
leaves a file behind if anything ever calls it. The official tensor names below are written out from NVlabs'
``training/networks.py`` for the tiny configs, not derived from the importer's mapping.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from architectures.stylegan2 import Discriminator, Generator
from launch.cli import main
from orchestrator.checkpoint import load_generator, read_checkpoint
from orchestrator.config import load_config
from orchestrator.tools.generate import Renderer, generate
from orchestrator.tools.imports.pickles import NetworkImportError

# ---------------------------------------------------------------------------------------------------
# Official StyleGAN2 names for G: z_dim 4, w_dim 4, 8×8 RGB, mapping 2 layers, channel_base 32, channel_max 8
# (8 channels at 4×4, 4 at 8×8), "skip" synthesis; and the ganforge name each one must become.

G_NAMES = {
    "mapping.fc0.weight": ((4, 4), "mapping.layers.0.weight"),
    "mapping.fc0.bias": ((4,), "mapping.layers.0.bias"),
    "mapping.fc1.weight": ((4, 4), "mapping.layers.1.weight"),
    "mapping.fc1.bias": ((4,), "mapping.layers.1.bias"),
    "mapping.w_avg": ((4,), "mapping.w_avg"),
    "synthesis.b4.const": ((8, 4, 4), "synthesis.blocks.0.const"),
    "synthesis.b4.resample_filter": ((4, 4), "synthesis.blocks.0.resample_filter"),
    "synthesis.b4.conv1.weight": ((8, 8, 3, 3), "synthesis.blocks.0.conv1.weight"),
    "synthesis.b4.conv1.noise_strength": ((), "synthesis.blocks.0.conv1.noise_strength"),
    "synthesis.b4.conv1.bias": ((8,), "synthesis.blocks.0.conv1.bias"),
    "synthesis.b4.conv1.resample_filter": ((4, 4), "synthesis.blocks.0.conv1.resample_filter"),
    "synthesis.b4.conv1.noise_const": ((4, 4), "synthesis.blocks.0.conv1.noise_const"),
    "synthesis.b4.conv1.affine.weight": ((8, 4), "synthesis.blocks.0.conv1.affine.weight"),
    "synthesis.b4.conv1.affine.bias": ((8,), "synthesis.blocks.0.conv1.affine.bias"),
    "synthesis.b4.torgb.weight": ((3, 8, 1, 1), "synthesis.blocks.0.torgb.weight"),
    "synthesis.b4.torgb.bias": ((3,), "synthesis.blocks.0.torgb.bias"),
    "synthesis.b4.torgb.affine.weight": ((8, 4), "synthesis.blocks.0.torgb.affine.weight"),
    "synthesis.b4.torgb.affine.bias": ((8,), "synthesis.blocks.0.torgb.affine.bias"),
    "synthesis.b8.resample_filter": ((4, 4), "synthesis.blocks.1.resample_filter"),
    "synthesis.b8.conv0.weight": ((4, 8, 3, 3), "synthesis.blocks.1.conv0.weight"),
    "synthesis.b8.conv0.noise_strength": ((), "synthesis.blocks.1.conv0.noise_strength"),
    "synthesis.b8.conv0.bias": ((4,), "synthesis.blocks.1.conv0.bias"),
    "synthesis.b8.conv0.resample_filter": ((4, 4), "synthesis.blocks.1.conv0.resample_filter"),
    "synthesis.b8.conv0.noise_const": ((8, 8), "synthesis.blocks.1.conv0.noise_const"),
    "synthesis.b8.conv0.affine.weight": ((8, 4), "synthesis.blocks.1.conv0.affine.weight"),
    "synthesis.b8.conv0.affine.bias": ((8,), "synthesis.blocks.1.conv0.affine.bias"),
    "synthesis.b8.conv1.weight": ((4, 4, 3, 3), "synthesis.blocks.1.conv1.weight"),
    "synthesis.b8.conv1.noise_strength": ((), "synthesis.blocks.1.conv1.noise_strength"),
    "synthesis.b8.conv1.bias": ((4,), "synthesis.blocks.1.conv1.bias"),
    "synthesis.b8.conv1.resample_filter": ((4, 4), "synthesis.blocks.1.conv1.resample_filter"),
    "synthesis.b8.conv1.noise_const": ((8, 8), "synthesis.blocks.1.conv1.noise_const"),
    "synthesis.b8.conv1.affine.weight": ((4, 4), "synthesis.blocks.1.conv1.affine.weight"),
    "synthesis.b8.conv1.affine.bias": ((4,), "synthesis.blocks.1.conv1.affine.bias"),
    "synthesis.b8.torgb.weight": ((3, 4, 1, 1), "synthesis.blocks.1.torgb.weight"),
    "synthesis.b8.torgb.bias": ((3,), "synthesis.blocks.1.torgb.bias"),
    "synthesis.b8.torgb.affine.weight": ((4, 4), "synthesis.blocks.1.torgb.affine.weight"),
    "synthesis.b8.torgb.affine.bias": ((4,), "synthesis.blocks.1.torgb.affine.bias"),
}
# With 3 classes: the label embedding, and fc0 reads z (4) and the embedding (4).
G_COND_NAMES = {
    **G_NAMES,
    "mapping.embed.weight": ((4, 3), "mapping.embed.weight"),
    "mapping.embed.bias": ((4,), "mapping.embed.bias"),
    "mapping.fc0.weight": ((4, 8), "mapping.layers.0.weight"),
}
# D ("resnet"): the 8×8 block (4 channels in, 8 out), then the 4×4 epilogue with 8 channels.
D_NAMES = {
    "b8.resample_filter": ((4, 4), "blocks.0.resample_filter"),
    "b8.fromrgb.weight": ((4, 3, 1, 1), "blocks.0.fromrgb.weight"),
    "b8.fromrgb.bias": ((4,), "blocks.0.fromrgb.bias"),
    "b8.fromrgb.resample_filter": ((4, 4), "blocks.0.fromrgb.resample_filter"),
    "b8.conv0.weight": ((4, 4, 3, 3), "blocks.0.conv0.weight"),
    "b8.conv0.bias": ((4,), "blocks.0.conv0.bias"),
    "b8.conv0.resample_filter": ((4, 4), "blocks.0.conv0.resample_filter"),
    "b8.conv1.weight": ((8, 4, 3, 3), "blocks.0.conv1.weight"),
    "b8.conv1.bias": ((8,), "blocks.0.conv1.bias"),
    "b8.conv1.resample_filter": ((4, 4), "blocks.0.conv1.resample_filter"),
    "b8.skip.weight": ((8, 4, 1, 1), "blocks.0.skip.weight"),
    "b8.skip.resample_filter": ((4, 4), "blocks.0.skip.resample_filter"),
    "b4.conv.weight": ((8, 9, 3, 3), "b4.conv.weight"),
    "b4.conv.bias": ((8,), "b4.conv.bias"),
    "b4.conv.resample_filter": ((4, 4), "b4.conv.resample_filter"),
    "b4.fc.weight": ((8, 128), "b4.fc.weight"),
    "b4.fc.bias": ((8,), "b4.fc.bias"),
    "b4.out.weight": ((1, 8), "b4.out.weight"),
    "b4.out.bias": ((1,), "b4.out.bias"),
}
# Conditional D: the label mapping (8 layers to cmap_dim = 8) and an 8-wide output projected onto it.
D_COND_NAMES = {
    **D_NAMES,
    "mapping.embed.weight": ((8, 3), "mapping.embed.weight"),
    "mapping.embed.bias": ((8,), "mapping.embed.bias"),
    **{
        f"mapping.fc{i}.{p}": (((8, 8) if p == "weight" else (8,)), f"mapping.layers.{i}.{p}")
        for i in range(8)
        for p in ("weight", "bias")
    },
    "b4.out.weight": ((8, 8), "b4.out.weight"),
    "b4.out.bias": ((8,), "b4.out.bias"),
}
BUFFERS = ("resample_filter", "noise_const", "w_avg")
TINY = dict(resolution=8, z_dim=4)


# ---------------------------------------------------------------------------------------------------
# Writing pickles in the official format.

PERSISTENCE_SRC = """
from pathlib import Path
import os

def _reconstruct_persistent_obj(meta):
    Path(os.environ["GANFORGE_TEST_RECONSTRUCT_SENTINEL"]).write_text("the pickle's code ran")
    raise RuntimeError("a test pickle was rebuilt by running its code")
"""


@pytest.fixture()
def official(tmp_path, monkeypatch):
    """Stand-in ``torch_utils.persistence`` and ``dnnlib.util`` modules (what the official pickles name)."""
    root = tmp_path / "official_src"
    (root / "torch_utils").mkdir(parents=True)
    (root / "dnnlib").mkdir()
    (root / "torch_utils" / "__init__.py").write_text("")
    (root / "torch_utils" / "persistence.py").write_text(PERSISTENCE_SRC)
    (root / "dnnlib" / "__init__.py").write_text("")
    (root / "dnnlib" / "util.py").write_text("class EasyDict(dict):\n    pass\n")
    sentinel = tmp_path / "RECONSTRUCT_CALLED"
    monkeypatch.setenv("GANFORGE_TEST_RECONSTRUCT_SENTINEL", str(sentinel))
    monkeypatch.syspath_prepend(str(root))
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import dnnlib.util
    import torch_utils.persistence

    yield Official(torch_utils.persistence._reconstruct_persistent_obj, dnnlib.util.EasyDict, sentinel)
    assert not sentinel.exists(), "the importer ran the pickle's reconstruct function"


class Official:
    """Builds persistence records as the official ``persistent_class.__reduce__`` writes them."""

    def __init__(self, reconstruct, easydict, sentinel: Path):
        self.reconstruct, self.EasyDict, self.sentinel = reconstruct, easydict, sentinel

    def record(self, class_name: str, state: dict, module_src: str = "# networks.py\n") -> Persistent:
        meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)
        return Persistent(self.reconstruct, meta)

    def module(self, class_name: str, params: dict, buffers: dict, modules: dict, **attrs) -> Persistent:
        state = {
            "training": False,
            "_parameters": OrderedDict((k, torch.nn.Parameter(v, requires_grad=False)) for k, v in params.items()),
            "_buffers": OrderedDict(buffers),
            "_non_persistent_buffers_set": set(),
            "_backward_hooks": OrderedDict(),
            "_forward_hooks": OrderedDict(),
            "_forward_pre_hooks": OrderedDict(),
            "_state_dict_hooks": OrderedDict(),
            "_load_state_dict_pre_hooks": OrderedDict(),
            "_modules": OrderedDict(modules),
            "_init_args": (),
            "_init_kwargs": attrs.pop("init_kwargs", {}),
            "act_gain": np.float64(math.sqrt(2)),  # the official layers keep numpy floats
            **attrs,
        }
        return self.record(class_name, state)

    def network(self, class_name: str, tensors: dict[str, torch.Tensor], init_kwargs: dict, attrs=None) -> Persistent:
        """A module tree from flat official names, as nested records."""
        attrs = attrs or {}
        tree: dict = {}
        for name, t in tensors.items():
            node = tree
            *path, leaf = name.split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = t
        for path in attrs:  # modules without tensors (D's minibatch-stddev layer)
            node = tree
            for part in path.split("."):
                node = node.setdefault(part, {})
        return self._build(class_name, tree, "", init_kwargs, attrs)

    def _build(self, class_name, tree, prefix, init_kwargs, attrs):
        params = {k: v for k, v in tree.items() if isinstance(v, torch.Tensor) and k not in BUFFERS}
        buffers = {k: v for k, v in tree.items() if isinstance(v, torch.Tensor) and k in BUFFERS}
        modules = {
            k: self._build("Module", v, f"{prefix}{k}.", {}, attrs) for k, v in tree.items() if isinstance(v, dict)
        }
        extra = attrs.get(prefix.rstrip("."), {})
        return self.module(class_name, params, buffers, modules, init_kwargs=init_kwargs, **extra)

    def networks(self, num_classes: int = 0, seed: int = 0, **changes) -> dict:
        """The dict an official ``network-snapshot-*.pkl`` holds, for the tiny config."""
        g_names = G_COND_NAMES if num_classes else G_NAMES
        d_names = D_COND_NAMES if num_classes else D_NAMES
        gen = torch.Generator().manual_seed(seed)
        g = {k: torch.randn(shape, generator=gen) for k, (shape, _) in g_names.items()}
        g_ema = {k: torch.randn(shape, generator=gen) for k, (shape, _) in g_names.items()}
        d = {k: torch.randn(shape, generator=gen) for k, (shape, _) in d_names.items()}
        for net in (g, g_ema, d):
            for k in net:
                if k.endswith("resample_filter"):
                    net[k] = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64
        E = self.EasyDict
        g_kwargs = dict(
            z_dim=4,
            w_dim=4,
            mapping_kwargs=E(num_layers=2),
            synthesis_kwargs=E(channel_base=32, channel_max=8, num_fp16_res=4, conv_clamp=256),
            c_dim=num_classes,
            img_resolution=8,
            img_channels=3,
        )
        d_kwargs = dict(
            c_dim=num_classes,
            img_resolution=8,
            img_channels=3,
            architecture="resnet",
            channel_base=32,
            channel_max=8,
            num_fp16_res=4,
            conv_clamp=256,
            block_kwargs=E(),
            mapping_kwargs=E(),
            epilogue_kwargs=E(mbstd_group_size=4),
        )
        g_attrs = {"mapping": {"w_avg_beta": 0.995, "num_layers": 2}}
        d_attrs = {"b4.mbstd": {"group_size": 4, "num_channels": 1}}
        tensors = changes.get("tensors", {})
        return {
            "G": self.network("Generator", tensors.get("G", g), g_kwargs, g_attrs),
            "D": self.network("Discriminator", tensors.get("D", d), d_kwargs, d_attrs),
            "G_ema": self.network("Generator", tensors.get("G_ema", g_ema), g_kwargs, g_attrs),
            "augment_pipe": None,
            "training_set_kwargs": E(class_name="training.dataset.ImageFolderDataset", path="~/datasets/x.zip"),
        }, {"G": g, "D": d, "G_ema": g_ema}

    def write(self, path: Path, data) -> Path:
        with open(path, "wb") as f:
            pickle.dump(data, f)  # as the official training_loop writes its snapshots
        return path


class Persistent:
    """An object that pickles as a ``torch_utils.persistence`` record."""

    def __init__(self, reconstruct, meta):
        self.reconstruct, self.meta = reconstruct, meta

    def __reduce__(self):
        return (self.reconstruct, (self.meta,))


def ganforge_generator(tensors: dict[str, torch.Tensor], names: dict, num_classes: int = 0) -> Generator:
    """ganforge's G for the tiny config, loaded through the literal name table above."""
    G = Generator(
        z_dim=4, w_dim=4, img_resolution=8, img_channels=3, num_classes=num_classes, mapping_layers=2,
        channel_base=32, channel_max=8, num_fp16_res=4, conv_clamp=256,
    )  # fmt: skip
    own = G.state_dict()
    G.load_state_dict({names[k][1]: t.reshape(own[names[k][1]].shape) for k, t in tensors.items()})
    return G.eval().requires_grad_(False)


def official_pixels(G: Generator, seed: int, class_index: int | None = None) -> np.ndarray:
    """What NVlabs' generate.py writes for a seed: RandomState z, const noise, ``img * 127.5 + 128`` as uint8."""
    z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim))
    c = None if class_index is None else torch.tensor([class_index])
    with torch.no_grad():
        img = G(z, c, noise_mode="const")
    return (img.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)[0].numpy()


def png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------------
# StyleGAN2


def test_import_maps_every_tensor_and_seeds_give_the_official_images(official, tmp_path):
    from orchestrator.tools.imports.stylegan2_ada import import_stylegan2_ada

    data, tensors = official.networks()
    pkl = official.write(tmp_path / "network-snapshot-000100.pkl", data)
    ckpt = import_stylegan2_ada(pkl, tmp_path / "run")

    c = read_checkpoint(ckpt)
    assert c.meta["arch"] == "stylegan2" and c.meta["generator"] == "G_ema" and c.meta["level"] is None
    assert c.meta["recipe"] == "noise_to_image" and c.spec.resolution == 8 and c.spec.num_classes == 0
    assert c.meta["model"]["mapping_layers"] == 2 and c.meta["model"]["conv_clamp"] == 256
    assert c.states["progress"] == {"step": 0, "nimg": 0, "phases": {}}
    assert c.states["imported_from"]["format"] == "stylegan2-ada"
    for key, names in (("G", G_NAMES), ("G_ema", G_NAMES), ("D", D_NAMES)):
        state = c.states[key]
        assert set(state) == {ours for _, ours in names.values()}
        for theirs, (_, ours) in names.items():
            assert torch.equal(state[ours].flatten(), tensors[key][theirs].flatten()), (key, theirs)

    G = ganforge_generator(tensors["G_ema"], G_NAMES)
    loaded = load_generator(ckpt)
    assert torch.equal(loaded.G.mapping.w_avg, tensors["G_ema"]["mapping.w_avg"])
    paths = generate(ckpt, tmp_path / "img", seeds=[0, 5, 123])
    for seed, path in zip([0, 5, 123], paths):
        assert np.array_equal(png(path), official_pixels(G, seed)), seed

    r = Renderer(ckpt)
    z, c_ = r.latent(5)
    assert c_ is None and torch.equal(z, torch.from_numpy(np.random.RandomState(5).randn(1, 4)).float())


def test_conditional_seed_draws_the_class_after_z(official, tmp_path):
    from orchestrator.tools.imports.stylegan2_ada import import_stylegan2_ada

    data, tensors = official.networks(num_classes=3, seed=1)
    ckpt = import_stylegan2_ada(official.write(tmp_path / "c.pkl", data), tmp_path / "run")
    assert read_checkpoint(ckpt).spec.num_classes == 3
    G = ganforge_generator(tensors["G_ema"], G_COND_NAMES, num_classes=3)
    D = Discriminator(img_resolution=8, img_channels=3, num_classes=3, channel_base=32, channel_max=8)
    D.load_state_dict(read_checkpoint(ckpt).states["D"])

    rs = np.random.RandomState(9)
    rs.randn(1, 4)
    drawn = int(rs.randint(3))
    r = Renderer(ckpt)
    assert int(r.latent(9)[1][0]) == drawn
    assert int(Renderer(ckpt, class_index=2).latent(9)[1][0]) == 2
    path = generate(ckpt, tmp_path / "img", seeds=[9], class_index=1)[0]
    assert np.array_equal(png(path), official_pixels(G, 9, class_index=1))


def test_code_in_a_pickle_is_refused_and_never_runs(official, tmp_path):
    from orchestrator.tools.imports.stylegan2_ada import import_stylegan2_ada

    sentinel = tmp_path / "SENTINEL"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    data, _ = official.networks()
    data["augment_pipe"] = Payload()
    pkl = official.write(tmp_path / "evil.pkl", data)
    with pytest.raises(
        NetworkImportError, match=r"refusing to load .*evil\.pkl: it asks for (posix|os)\.system.*never runs code"
    ):
        import_stylegan2_ada(pkl, tmp_path / "run")
    assert not sentinel.exists()

    # module_src is what the official loader executes; here it would leave the sentinel behind.
    src = f"open({str(sentinel)!r}, 'w').write('ran')\nclass Generator: pass\n"
    data, _ = official.networks()
    data["G_ema"].meta["module_src"] = src
    data["D"] = official.record("Discriminator", {"_modules": {}}, module_src=src)
    with pytest.raises(NetworkImportError, match="D"):
        import_stylegan2_ada(official.write(tmp_path / "src.pkl", data), tmp_path / "run2")
    assert not sentinel.exists()

    with pytest.raises(NetworkImportError, match="refusing .*builtins.eval"):
        from orchestrator.tools.imports.pickles import load_network_pickle

        (tmp_path / "eval.pkl").write_bytes(pickle.dumps(eval))  # noqa: S301 - the refused global
        load_network_pickle(tmp_path / "eval.pkl")


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", r"G_ema: .*does not fill: \['synthesis.blocks.1.conv1.noise_const'\]"),
        ("extra", r"G_ema: tensors left over .*\['synthesis.b8.conv1.extra'\]"),
        ("shape", r"G_ema: mis-shaped tensors: \['synthesis.b8.torgb.bias: file \(4,\)"),
        ("d_extra", r"D: tensors left over .*\['b4.mbstd.weight'\]"),
    ],
    ids=["missing", "extra", "shape", "d_extra"],
)
def test_a_tensor_missing_extra_or_misshaped_is_named(official, tmp_path, change, message):
    from orchestrator.tools.imports.stylegan2_ada import import_stylegan2_ada

    _, tensors = official.networks()
    g_ema, d = dict(tensors["G_ema"]), dict(tensors["D"])
    if change == "missing":
        del g_ema["synthesis.b8.conv1.noise_const"]
    elif change == "extra":
        g_ema["synthesis.b8.conv1.extra"] = torch.zeros(2)
    elif change == "shape":
        g_ema["synthesis.b8.torgb.bias"] = torch.zeros(4)
    else:
        d["b4.mbstd.weight"] = torch.zeros(1)
    data, _ = official.networks(tensors={"G_ema": g_ema, "D": d})
    with pytest.raises(NetworkImportError, match=message):
        import_stylegan2_ada(official.write(tmp_path / "bad.pkl", data), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_init_keywords_without_a_ganforge_equivalent_are_refused(official, tmp_path):
    from orchestrator.tools.imports.stylegan2_ada import import_stylegan2_ada

    data, _ = official.networks()
    data["G_ema"].meta["state"]["_init_kwargs"]["mapping_kwargs"]["embed_features"] = 16
    with pytest.raises(NetworkImportError, match="embed_features=16 has no ganforge equivalent"):
        import_stylegan2_ada(official.write(tmp_path / "kw.pkl", data), tmp_path / "run")


def test_cli_imports_and_generates(official, tmp_path, capsys):
    data, tensors = official.networks()
    pkl = official.write(tmp_path / "net.pkl", data)
    assert main(["import", "stylegan2-ada", str(pkl), str(tmp_path / "run")]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-000000000"
    assert str(ckpt) in capsys.readouterr().out
    assert main(["generate", str(ckpt), "--seeds", "3", "--out", str(tmp_path / "img")]) == 0
    assert np.array_equal(
        png(tmp_path / "img" / "seed0003.png"), official_pixels(ganforge_generator(tensors["G_ema"], G_NAMES), 3)
    )

    assert main(["import", "stylegan2-ada", str(tmp_path / "nope.pkl"), str(tmp_path / "run2")]) == 2
    assert "nope.pkl does not exist" in capsys.readouterr().err
    assert main(["import", "stylegan2-ada", str(pkl), str(tmp_path / "run")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# BigGAN-PyTorch: 32 px, ch 2 (8 channels everywhere), 3 classes, shared_dim 4, hierarchical z of 4 chunks of 2,
# attention at 16 px (after G's block 1 and D's block 0). Names as the authors' BigGAN.py and layers.py give them.


def _sn(name: str, out: int, shape: tuple, bias: bool = True) -> dict:
    d = {f"{name}.weight": shape, f"{name}.u0": (1, out), f"{name}.sv0": (1,)}
    return {**d, f"{name}.bias": (out,)} if bias else d


def _attention(prefix: str) -> dict:
    return {
        **_sn(f"{prefix}.theta", 1, (1, 8, 1, 1), bias=False),
        **_sn(f"{prefix}.phi", 1, (1, 8, 1, 1), bias=False),
        **_sn(f"{prefix}.g", 4, (4, 8, 1, 1), bias=False),
        **_sn(f"{prefix}.o", 8, (8, 4, 1, 1), bias=False),
        f"{prefix}.gamma": (),
    }


def biggan_shapes() -> tuple[dict, dict]:
    g = {"shared.weight": (3, 4), **_sn("linear", 128, (128, 2))}
    for i in range(3):
        for conv, shape in (("conv1", (8, 8, 3, 3)), ("conv2", (8, 8, 3, 3)), ("conv_sc", (8, 8, 1, 1))):
            g.update(_sn(f"blocks.{i}.0.{conv}", 8, shape))
        for bn in ("bn1", "bn2"):
            g.update(_sn(f"blocks.{i}.0.{bn}.gain", 8, (8, 6), bias=False))
            g.update(_sn(f"blocks.{i}.0.{bn}.bias", 8, (8, 6), bias=False))
            g.update({f"blocks.{i}.0.{bn}.stored_mean": (8,), f"blocks.{i}.0.{bn}.stored_var": (8,)})
    g.update(_attention("blocks.1.1"))
    g.update({f"output_layer.0.{k}": (8,) for k in ("gain", "bias", "stored_mean", "stored_var")})
    g.update(_sn("output_layer.2", 3, (3, 8, 3, 3)))
    d = {**_sn("blocks.0.0.conv1", 8, (8, 3, 3, 3)), **_sn("blocks.0.0.conv2", 8, (8, 8, 3, 3))}
    d.update(_sn("blocks.0.0.conv_sc", 8, (8, 3, 1, 1)))
    d.update(_attention("blocks.0.1"))
    d.update({**_sn("blocks.1.0.conv1", 8, (8, 8, 3, 3)), **_sn("blocks.1.0.conv2", 8, (8, 8, 3, 3))})
    d.update(_sn("blocks.1.0.conv_sc", 8, (8, 8, 1, 1)))
    for i in (2, 3):
        d.update({**_sn(f"blocks.{i}.0.conv1", 8, (8, 8, 3, 3)), **_sn(f"blocks.{i}.0.conv2", 8, (8, 8, 3, 3))})
    d.update({**_sn("linear", 1, (1, 8)), **_sn("embed", 3, (3, 8), bias=False)})
    return g, d


def biggan_files(tmp_path: Path, extra: dict | None = None) -> tuple[list[Path], dict]:
    gen = torch.Generator().manual_seed(0)
    g_shapes, d_shapes = biggan_shapes()
    sds = {
        key: {
            k: (torch.rand(s, generator=gen) + 0.5 if k.endswith("var") else torch.randn(s, generator=gen))
            for k, s in shapes.items()
        }
        for key, shapes in (("G", g_shapes), ("D", d_shapes), ("G_ema", g_shapes))
    }
    sds["G_ema"].update(extra or {})
    paths = []
    for key, sd in sds.items():
        torch.save(sd, tmp_path / f"{key}.pth")
        paths.append(tmp_path / f"{key}.pth")
    return paths, sds


def authors_sigma(weight: torch.Tensor, u0: torch.Tensor, eps: float) -> torch.Tensor:
    """σ as the authors' SN layer computes it in eval mode (layers.power_iteration with update=False)."""
    w = weight.reshape(weight.shape[0], -1)
    v = torch.nn.functional.normalize(u0 @ w, eps=eps)
    u = torch.nn.functional.normalize(v @ w.t(), eps=eps)
    return (v @ w.t() @ u.t()).squeeze()


BIGGAN_RENAMES = [  # authors' name → ganforge's, a sample across every kind of tensor
    ("linear.weight", "linear.parametrizations.weight.original"),
    ("blocks.2.0.conv_sc.bias", "blocks.2.conv_sc.bias"),
    ("blocks.0.0.bn1.gain.weight", "blocks.0.bn1.gain.parametrizations.weight.original"),
    ("blocks.1.0.bn2.stored_var", "blocks.1.bn2.bn.running_var"),
    ("blocks.1.1.g.weight", "attn.1.g.parametrizations.weight.original"),
    ("blocks.1.1.gamma", "attn.1.gamma"),
    ("output_layer.0.gain", "output.0.weight"),
    ("output_layer.0.stored_mean", "output.0.running_mean"),
    ("output_layer.2.bias", "output.2.bias"),
    ("shared.weight", "shared.weight"),
]


def test_biggan_import_maps_every_tensor_and_keeps_sigma(tmp_path):
    from orchestrator.tools.imports.biggan_pytorch import import_biggan_pytorch

    paths, sds = biggan_files(tmp_path)
    ckpt = import_biggan_pytorch(*paths, tmp_path / "run")
    c = read_checkpoint(ckpt)
    model = c.meta["model"]
    assert (c.spec.resolution, c.spec.channels, c.spec.num_classes) == (32, 3, 3)
    assert (model["g_ch"], model["d_ch"], model["z_dim"], model["shared_dim"]) == (2, 2, 8, 4)
    assert model["hier"] and model["attention"] == [16]
    state = c.states["G_ema"]
    for theirs, ours in BIGGAN_RENAMES:
        assert torch.equal(state[ours].flatten(), sds["G_ema"][theirs].flatten()), theirs
    assert torch.equal(c.states["D"]["embed.parametrizations.weight.original"], sds["D"]["embed.weight"])

    loaded = load_generator(ckpt).G  # eval mode: torch's SN divides by σ = uᵀWv of the stored u, v
    checked = 0
    for name, module in loaded.named_modules():
        if hasattr(module, "parametrizations"):
            authors = re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.0.", name)
            authors = re.sub(r"^attn\.(\d+)\.", r"blocks.\1.1.", authors).replace("output.", "output_layer.")
            w, u0 = sds["G_ema"][f"{authors}.weight"], sds["G_ema"][f"{authors}.u0"]
            assert torch.allclose(module.weight, w / authors_sigma(w, u0, 1e-6), rtol=1e-5, atol=1e-6), name
            checked += 1
    assert checked == 27
    assert loaded(torch.randn(2, 8), torch.tensor([0, 2])).shape == (2, 3, 32, 32)


def test_biggan_leftover_tensor_is_named(tmp_path):
    from orchestrator.tools.imports.biggan_pytorch import import_biggan_pytorch

    paths, _ = biggan_files(tmp_path, extra={"blocks.0.0.bn1.accumulation_counter": torch.zeros(1)})
    with pytest.raises(NetworkImportError, match=r"G_ema\.pth \(G_ema\): tensors left over .*accumulation_counter"):
        import_biggan_pytorch(*paths, tmp_path / "run")


def test_biggan_cli_and_generate(tmp_path, capsys):
    paths, _ = biggan_files(tmp_path)
    assert main(["import", "biggan-pytorch", *map(str, paths), str(tmp_path / "run")]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-000000000"
    assert main(["generate", str(ckpt), "--seeds", "0-1", "--out", str(tmp_path / "img")]) == 0
    assert (tmp_path / "img" / "seed0001.png").exists()
    (tmp_path / "bad.pth").write_bytes(pickle.dumps({"w": os.system}))
    assert (
        main(["import", "biggan-pytorch", str(tmp_path / "bad.pth"), *map(str, paths[1:]), str(tmp_path / "r2")]) == 2
    )
    assert "bad.pth" in capsys.readouterr().err


def test_an_imported_network_is_fine_tuned_with_init_from(official, tmp_path):
    """``ganforge import`` then ``ganforge train --init-from``: a new run on other data (8×8 RGB shards written
    here) starts from the imported G, D and G_ema, with ADA and Freeze-D, and trains."""
    from orchestrator.data.write import write_shards
    from orchestrator.tools.imports.stylegan2_ada import import_stylegan2_ada
    from orchestrator.train.run import Run

    data, _ = official.networks()
    ckpt = import_stylegan2_ada(official.write(tmp_path / "net.pkl", data), tmp_path / "imported")
    rng = np.random.RandomState(0)
    np.savez(tmp_path / "rgb.npz", images=rng.randint(0, 256, (80, 8, 8, 3), dtype=np.uint8))
    write_shards(str(tmp_path / "rgb.npz"), tmp_path / "shards", resolution=8, shard_size=40)
    sets = [f"data.shards={tmp_path / 'shards' / 'train-*.tar'}", "data.workers=0", "train.batch_size=4",
            "train.total_kimg=0.008", "train.device=cpu", "eval.enabled=false", "tracking.wandb.mode=disabled",
            "tracking.progress_bar=false", "augment.kind=ada", "finetune.freeze_d=1"]  # fmt: skip
    config = tmp_path / "imported" / "config.yaml"
    cfg = load_config(config, sets + [f"finetune.init_from={ckpt}"])
    run = Run.build(cfg, tmp_path / "probe")
    imported = read_checkpoint(ckpt).states
    for name in ("G", "D", "G_ema"):
        mine = run.step_ctx.raw[name].state_dict()
        assert all(torch.equal(mine[k], imported[name][k]) for k in mine), name
    args = ["train", str(config), "--run-dir", str(tmp_path / "ft"), "--init-from", str(ckpt)]
    assert main(args + [x for s in sets for x in ("--set", s)]) == 0
    assert (tmp_path / "ft" / "checkpoints" / "ckpt-000000002").exists()
