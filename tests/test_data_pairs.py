"""Image-to-image shards: built-in sources, paired, unpaired and super-resolution writing, streaming, held-out
reading and the ``ganforge data pairs / unpaired / superres`` commands."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from core.spec import ImageSpec
from launch.cli import main
from orchestrator.data import builtins
from orchestrator.data.errors import DataError
from orchestrator.data.heldout import read_heldout
from orchestrator.data.shards import (
    DataConfig,
    ShardLoader,
    ShardStream,
    decode_paired,
    downscale,
    expand_shards,
    image_spec,
    load_manifest,
)
from orchestrator.data.sources import prepare_image, read_source
from orchestrator.data.write import write_pairs, write_superres, write_unpaired


def read_all(pattern: str) -> list[dict]:
    return list(wds.WebDataset(expand_shards(pattern), shardshuffle=False, empty_check=False))


def spec_of(out: Path) -> ImageSpec:
    cfg = DataConfig(shards=str(out / "train-*.tar"))
    return image_spec(cfg, load_manifest(cfg))


def uint8(x: torch.Tensor) -> torch.Tensor:
    """Stream output in [-1, 1] back to the stored pixels."""
    return ((x + 1) * 127.5).round().to(torch.uint8)


def pil_tensor(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img).copy())
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edges2digits")
    write_pairs("builtin:digits-edges", "builtin:digits", out, resolution=16, input_resolution=8, shard_size=300)
    return out


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits2m")
    write_unpaired("builtin:digits", "builtin:digits-m", out, resolution=16, shard_size=200)
    return out


@pytest.fixture(scope="module")
def superres(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos-sr")
    write_superres("builtin:photos", out, resolution=64, crop=16, scale=4, holdout=0.25, shard_size=2)
    return out


# ---------------------------------------------------------------------------------------------
# Built-in sources


def test_digit_builtins_share_keys_and_labels():
    digits = read_source("builtin:digits")
    for name, mode in (("builtin:digits-edges", "L"), ("builtin:digits-m", "RGB")):
        other = read_source(name)
        assert other.keys == digits.keys and other.labels == digits.labels and other.class_names == digits.class_names
        assert {(im.mode, im.size) for im in other.images} == {(mode, (32, 32))}
    edges = builtins.digits_edges()
    assert set(np.unique(edges)) == {0, 255} and min((e > 0).sum() for e in edges) > 20  # every digit has edges


def test_digits_m_is_fixed_and_its_grey_level_shows_the_digit():
    images, patches = builtins.digits_m()
    builtins.digits_m.cache_clear()
    again, _ = builtins.digits_m()
    assert np.array_equal(images, again)  # seeded: the same every time
    assert len({p.tobytes() for p in patches}) > 1700  # a different photo patch under each digit
    digit = builtins.digits_upsampled().astype(float)
    diff = np.abs(images.astype(float) - patches).mean(-1)
    assert np.corrcoef(diff.ravel(), digit.ravel())[0, 1] > 0.8
    assert np.array_equal(images, np.round(np.abs(patches - digit[..., None])).astype(np.uint8))


def test_photos_and_unknown_builtins():
    photos = read_source("builtin:photos")
    assert photos.labels is None and "astronaut" in photos.keys and set(photos.keys) <= set(builtins.PHOTO_NAMES)
    assert all(im.mode == "RGB" and min(im.size) >= 256 for im in photos.images)
    with pytest.raises(DataError) as e:
        read_source("builtin:cifar")
    assert "unknown built-in data set 'builtin:cifar'" in str(e.value)
    assert all(b in str(e.value) for b in ("builtin:digits,", "builtin:digits-edges", "digits-m", "builtin:photos"))


# ---------------------------------------------------------------------------------------------
# Paired


def _folder_pair(root: Path) -> None:
    """A: grey inputs, B: colour targets in cats/ and dogs/; B's dogs/1 is corrupt, A's cats/9 has no target,
    B's dogs/7 no input, and cats/3 is square in A but wide in B."""
    for cls, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (root / "a" / cls).mkdir(parents=True)
        (root / "b" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (12, 12), 30 * i + (100 if cls == "dogs" else 0)).save(root / "a" / cls / f"{i}.png")
            Image.new("RGB", (24, 24), (color[0], 40 * i, color[2])).save(root / "b" / cls / f"{i}.bmp")
    Image.new("L", (12, 12), 9).save(root / "a" / "cats" / "9.png")
    Image.new("RGB", (24, 24)).save(root / "b" / "dogs" / "7.png")
    (root / "b" / "dogs" / "1.bmp").write_bytes(b"not a bitmap")
    Image.new("RGB", (36, 24)).save(root / "b" / "cats" / "3.bmp")


def test_pairs_are_matched_by_key_and_the_rest_listed(tmp_path):
    _folder_pair(tmp_path)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    m = write_pairs(a, b, tmp_path / "out", resolution=8, input_resolution=4, holdout=0.25, shard_size=2)
    assert (m["kind"], m["resolution"], m["channels"], m["input_resolution"], m["input_channels"]) == (
        "paired",
        8,
        3,
        4,
        1,
    )
    assert (m["num_classes"], m["class_names"], m["pairs"]) == (2, ["cats", "dogs"], 6)
    assert m["skipped"] == [
        {"source": b, "file": "dogs/1.bmp", "reason": "not a readable image (cannot identify image file)"},
        {"source": a, "file": "cats/9.png", "reason": f"no counterpart in {b}"},
        {"source": a, "file": "dogs/1.png", "reason": f"no counterpart in {b}"},
        {"source": b, "file": "dogs/7.png", "reason": f"no counterpart in {a}"},
        {
            "source": f"{a} + {b}",
            "file": "cats/3.png + cats/3.bmp",
            "reason": "12×12 input but 36×24 target: different aspect ratios",
        },
    ]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == m["skipped"]
    samples = read_all(str(tmp_path / "out" / "train-*.tar")) + read_all(str(tmp_path / "out" / "holdout-*.tar"))
    assert m["splits"]["holdout"]["count"] == 2 and m["splits"]["train"]["count"] == 4  # split by pair
    assert sorted(s["src.txt"].decode() for s in samples) == [
        "cats/0",
        "cats/1",
        "cats/2",
        "dogs/0",
        "dogs/2",
        "dogs/3",
    ]
    for s in samples:  # each input is its target's counterpart: the grey level and the colour follow the key
        cls, i = s["src.txt"].decode().split("/")
        inp, img = np.asarray(Image.open(io.BytesIO(s["input.png"]))), np.asarray(Image.open(io.BytesIO(s["png"])))
        assert inp.shape == (4, 4) and img.shape == (8, 8, 3) and int(s["cls"]) == ("cats", "dogs").index(cls)
        assert inp[0, 0] == 30 * int(i) + (100 if cls == "dogs" else 0) and img[0, 0, 1] == 40 * int(i)


def test_paired_stream_gives_aligned_input_and_image(paired):
    m = json.loads((paired / "manifest.json").read_text())
    spec = spec_of(paired)
    assert spec == ImageSpec(16, 1, 10, input_resolution=8, input_channels=1, pairing="paired") and spec.translates
    src = {s["__key__"]: s["src.txt"].decode() for s in read_all(str(paired / "train-*.tar"))}
    digits, edges = read_source("builtin:digits"), read_source("builtin:digits-edges")
    urls = expand_shards(str(paired / "train-*.tar"))
    seen = 0
    for b in ShardStream(urls, spec, 16, seed=0, mirror=True):
        assert b.input.shape == (16, 1, 8, 8) and b.img.shape == (16, 1, 16, 16)
        for key, inp, img, label in zip(b.keys, b.input, b.img, b.label):
            i = digits.keys.index(src[key.removesuffix(":mirror")])
            want_in = pil_tensor(prepare_image(edges.images[i], 8, 1))
            want_img = pil_tensor(prepare_image(digits.images[i], 16, 1))
            if key.endswith(":mirror"):  # mirrored together
                want_in, want_img = want_in.flip(-1), want_img.flip(-1)
            assert torch.equal(uint8(inp), want_in) and torch.equal(uint8(img), want_img)
            assert label == digits.labels[i]
        seen += 1
        if seen == 6:
            break
    assert m["splits"]["train"]["count"] + m["splits"]["holdout"]["count"] == 1797


def test_bad_paired_samples_are_named():
    spec = ImageSpec(16, 1, 10, input_resolution=8, input_channels=1, pairing="paired")

    def png(mode, size):
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format="PNG")
        return buf.getvalue()

    good = {"__key__": "k", "input.png": png("L", (8, 8)), "png": png("L", (16, 16)), "cls": b"3"}
    assert decode_paired(good, spec)[2] == 3
    assert decode_paired({**good, "input.png": None}, spec).startswith("no input image (input.png) member")
    assert decode_paired({**good, "input.png": png("L", (16, 16))}, spec) == "input: L 16×16, expected L 8×8"
    assert decode_paired({**good, "png": png("RGB", (16, 16))}, spec) == "RGB 16×16, expected L 16×16"
    assert decode_paired({**good, "input.png": b"junk"}, spec) == "input: not an image: UnidentifiedImageError"
    assert decode_paired({**good, "cls": b"12"}, spec) == "label 12 out of range [0, 10)"


def test_paired_writer_errors(tmp_path):
    with pytest.raises(DataError, match="--input-resolution 12: must be a power of two"):
        write_pairs("builtin:digits-edges", "builtin:digits", tmp_path / "o", resolution=16, input_resolution=12)
    with pytest.raises(DataError, match="no image of builtin:photos has a counterpart in builtin:digits"):
        write_pairs("builtin:photos", "builtin:digits", tmp_path / "o", resolution=16)
    with pytest.raises(DataError, match="unknown built-in data set 'builtin:edges'"):
        write_pairs("builtin:edges", "builtin:digits", tmp_path / "o", resolution=16)


# ---------------------------------------------------------------------------------------------
# Unpaired


def test_unpaired_domains_share_no_item(unpaired):
    m = json.loads((unpaired / "manifest.json").read_text())
    assert (m["kind"], m["channels"], m["input_channels"], m["shared_keys_split"]) == ("unpaired", 3, 1, 1797)
    assert set(m["splits"]) == {"train-a", "train-b", "holdout-a", "holdout-b"}
    a = read_all(str(unpaired / "train-a-*.tar")) + read_all(str(unpaired / "holdout-a-*.tar"))
    b = read_all(str(unpaired / "train-b-*.tar")) + read_all(str(unpaired / "holdout-b-*.tar"))
    keys_a, keys_b = {s["src.txt"] for s in a}, {s["src.txt"] for s in b}
    assert not keys_a & keys_b and len(keys_a | keys_b) == 1797 and abs(len(keys_a) - len(keys_b)) <= 1
    assert all("cls" in s for s in a + b)  # both domains are labelled
    spec = spec_of(unpaired)
    assert (spec.pairing, spec.input_channels, spec.channels, spec.num_classes) == ("unpaired", 1, 3, 10)


def test_unpaired_loader_reads_two_independent_streams(unpaired):
    cfg = DataConfig(shards=str(unpaired / "train-*.tar"), workers=0, shuffle_buffer=50)
    spec = spec_of(unpaired)
    loader = ShardLoader(cfg, spec, 32, seed=4)
    batches = [loader.next() for _ in range(60)]  # > 2 epochs of each domain (~808 images / 32)
    b = batches[0]
    assert b.img.shape == (32, 3, 16, 16) and b.input.shape == (32, 1, 16, 16) and b.label.shape == (32,)
    assert all(k.startswith("b-") for k in b.keys) and all(k.startswith("a-") for k in b.input_keys)
    # A is its own stream: the same sequence as reading domain A's shards alone
    urls_a = expand_shards(str(unpaired / "train-a-*.tar"))
    alone = iter(ShardStream(urls_a, ImageSpec(16, 1), 32, seed=4, shuffle_buffer=50, domain="-a"))
    assert [x.input_keys for x in batches] == [next(alone).keys for _ in batches]
    # and the two are not tied: which A meets which B changes from epoch to epoch
    by_b = {}
    for x in batches:
        for kb, ka in zip(x.keys, x.input_keys):
            by_b.setdefault(kb, set()).add(ka)
    assert sum(len(v) > 1 for v in by_b.values()) > 100


@pytest.mark.parametrize("workers", [0, 2])
def test_unpaired_loader_resumes_exactly(unpaired, workers):
    cfg = DataConfig(shards=str(unpaired / "train-*.tar"), workers=workers, shuffle_buffer=50)
    spec = spec_of(unpaired)
    ref = ShardLoader(cfg, spec, 24, seed=5)
    expected = [(b.keys, b.input_keys) for b in (ref.next() for _ in range(45))]
    first = ShardLoader(cfg, spec, 24, seed=5)
    for _ in range(20):
        first.next()
    state = first.state_dict()
    assert set(state["input"]) == {"batches", "cursors"}
    second = ShardLoader(cfg, spec, 24, seed=5)
    second.load_state_dict(state)
    assert [(b.keys, b.input_keys) for b in (second.next() for _ in range(25))] == expected[20:]


def test_unpaired_shards_must_name_their_domain(paired, unpaired):
    spec = spec_of(unpaired)
    with pytest.raises(DataError, match=r"is of neither domain; unpaired shards are named train-a-NNNNNN.tar"):
        ShardLoader(DataConfig(shards=str(paired / "train-*.tar"), workers=0), spec, 8, seed=0)
    with pytest.raises(DataError, match="no domain-B shard"):
        ShardLoader(DataConfig(shards=str(unpaired / "train-a-*.tar"), workers=0), spec, 8, seed=0)


# ---------------------------------------------------------------------------------------------
# Super-resolution


def test_superres_manifest_and_spec(superres):
    m = json.loads((superres / "manifest.json").read_text())
    assert (m["kind"], m["resolution"], m["stored_resolution"], m["scale"]) == ("superres", 16, 64, 4)
    assert (m["input_resolution"], m["input_channels"], m["channels"], m["tiles_per_image"]) == (4, 3, 3, 16)
    assert m["splits"]["holdout"]["count"] == 16 * m["holdout_images"] == 32
    assert spec_of(superres) == ImageSpec(16, 3, 0, input_resolution=4, input_channels=3, pairing="paired")
    train = read_all(str(superres / "train-*.tar"))
    assert {Image.open(io.BytesIO(s["png"])).size for s in train} == {(64, 64)}  # whole images, no LR stored
    assert all(set(s) >= {"png"} and "input.png" not in s for s in train)


def test_superres_crops_are_random_deterministic_across_resume_and_lr_is_bicubic(superres):
    cfg = DataConfig(shards=str(superres / "train-*.tar"), workers=0, shuffle_buffer=4)
    spec = spec_of(superres)
    stored = {s["__key__"]: pil_tensor(Image.open(io.BytesIO(s["png"]))) for s in read_all(cfg.shards)}
    ref = ShardLoader(cfg, spec, 2, seed=1)
    expected = [ref.next() for _ in range(12)]  # 4 epochs of 6 images
    positions = set()
    for b in expected:
        for key, hr, lr in zip(b.keys, uint8(b.img), uint8(b.input)):
            full = stored[key]
            found = [(y, x) for y in range(49) for x in range(49) if torch.equal(full[:, y : y + 16, x : x + 16], hr)]
            assert found, f"{key}: the HR image is not a 16 px crop of the stored image"
            positions.add((key, found[0]))
            want = np.asarray(Image.fromarray(hr.permute(1, 2, 0).numpy()).resize((4, 4), Image.Resampling.BICUBIC))
            assert torch.equal(lr, torch.from_numpy(want.copy()).permute(2, 0, 1))
            assert torch.equal(downscale(hr, 4), lr)
    assert len(positions) > 18  # each epoch crops elsewhere
    first = ShardLoader(cfg, spec, 2, seed=1)
    for _ in range(5):
        first.next()
    second = ShardLoader(cfg, spec, 2, seed=1)
    second.load_state_dict(first.state_dict())
    for b, e in zip((second.next() for _ in range(7)), expected[5:]):
        assert b.keys == e.keys and torch.equal(b.img, e.img) and torch.equal(b.input, e.input)


def test_downscale_takes_pil_and_tensors_and_refuses_odd_sizes():
    img = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    small = downscale(img, 2)
    assert isinstance(small, Image.Image) and small.size == (4, 4)
    t = pil_tensor(img)
    assert torch.equal(downscale(t, 2), pil_tensor(small)) and downscale(t[None], 2).shape == (1, 3, 4, 4)
    assert downscale(pil_tensor(img.convert("L")), 2).shape == (1, 4, 4)
    with pytest.raises(DataError, match="a 8×8 image cannot be shrunk by 3"):
        downscale(img, 3)


# ---------------------------------------------------------------------------------------------
# Held-out reading


def test_heldout_superres_tiles_are_fixed_and_cover_the_images(superres):
    spec = spec_of(superres)
    urls = expand_shards(str(superres / "holdout-*.tar"))
    h = read_heldout(urls, spec)
    assert h.a.shape == (32, 3, 4, 4) and h.b.shape == (32, 3, 16, 16) and h.a.dtype == h.b.dtype == torch.uint8
    assert h.a_labels is None and h.b_labels is None
    assert torch.equal(downscale(h.b, 4), h.a)
    again = read_heldout(urls, spec)
    assert torch.equal(again.a, h.a) and torch.equal(again.b, h.b)
    photos = read_source("builtin:photos")
    names = [s["src.txt"].decode() for s in read_all(str(superres / "holdout-*.tar"))]
    for i, name in enumerate(names):  # tile (y, x) of the photo, as stored at 64 px
        key, yx = name.split("@")
        y, x = map(int, yx.split(","))
        full = pil_tensor(prepare_image(photos.images[photos.keys.index(key)], 64, 3))
        assert torch.equal(h.b[i], full[:, y : y + 16, x : x + 16])
    assert len(read_heldout(urls, spec, limit=5).a) == 5


def test_heldout_pairs_are_aligned(paired):
    spec = spec_of(paired)
    h = read_heldout(expand_shards(str(paired / "holdout-*.tar")), spec)
    assert h.a.shape == (180, 1, 8, 8) and h.b.shape == (180, 1, 16, 16) and h.b_labels.shape == (180,)
    digits, edges = read_source("builtin:digits"), read_source("builtin:digits-edges")
    for row, s in enumerate(read_all(str(paired / "holdout-*.tar"))):
        i = digits.keys.index(s["src.txt"].decode())
        assert torch.equal(h.a[row], pil_tensor(prepare_image(edges.images[i], 8, 1)))
        assert torch.equal(h.b[row], pil_tensor(prepare_image(digits.images[i], 16, 1)))
        assert h.b_labels[row] == digits.labels[i]


def test_heldout_unpaired_has_both_domains(unpaired):
    spec = spec_of(unpaired)
    h = read_heldout(expand_shards(str(unpaired / "holdout-*.tar")), spec, limit=50)
    assert h.a.shape == (50, 1, 16, 16) and h.b.shape == (50, 3, 16, 16)
    assert h.a_labels.shape == h.b_labels.shape == (50,)
    with pytest.raises(DataError, match="plain images"):
        read_heldout(expand_shards(str(unpaired / "holdout-*.tar")), ImageSpec(16, 3))


def test_bad_heldout_sample_names_shard_and_key(tmp_path, paired):
    spec = spec_of(paired)
    shard = tmp_path / "holdout-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        for s in read_all(str(paired / "holdout-000000.tar"))[:3]:
            w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
        w.write({"__key__": "lonely", "png": s["png"], "cls": 1})
    with pytest.raises(DataError, match=rf"held-out shard {shard}, sample lonely: no input image \(input.png\)"):
        read_heldout([str(shard)], spec)


# ---------------------------------------------------------------------------------------------
# Commands


def test_data_commands(tmp_path, capsys):
    assert (
        main(["data", "pairs", "builtin:digits-edges", "builtin:digits", str(tmp_path / "p"), "--resolution", "8"]) == 0
    )
    out = capsys.readouterr().out
    assert "training pairs and 180 held-out pairs" in out and "0 file(s) had no counterpart" in out
    assert (
        main(["data", "unpaired", "builtin:digits", "builtin:digits-m", str(tmp_path / "u"), "--resolution", "8"]) == 0
    )
    assert "1797 key(s) were in both sources: each went to one domain only" in capsys.readouterr().out
    argv = ["data", "superres", "builtin:photos", str(tmp_path / "s"), "--resolution", "64", "--crop", "32"]
    assert main(argv + ["--scale", "2", "--holdout", "0.25"]) == 0
    assert "held-out 32 px tiles of 2 image(s)" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["input_resolution"] == 16
    assert main(argv[:-1] + ["128"]) == 2
    assert "--crop 128 with --scale 4 and --resolution 64: the crop must be a multiple of the scale and at most" in (
        capsys.readouterr().err
    )
    assert main(["data", "pairs", "builtin:digits", "builtin:nope", str(tmp_path / "x"), "--resolution", "8"]) == 2
    assert "unknown built-in data set 'builtin:nope'" in capsys.readouterr().err


def test_old_manifests_are_images(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"resolution": 8, "channels": 1, "num_classes": 0}))
    (tmp_path / "train-000000.tar").write_bytes(b"")
    spec = spec_of(tmp_path)
    assert spec == ImageSpec(8, 1) and spec.pairing == "none" and not spec.translates
