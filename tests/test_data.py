"""Shards: writing from every source kind, the manifest, streaming, bad samples, resumable position."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from core.spec import ImageSpec
from orchestrator.data.errors import DataError
from orchestrator.data.shards import (
    DataConfig,
    DataHealth,
    ShardLoader,
    ShardStream,
    expand_shards,
    image_spec,
    load_manifest,
)
from orchestrator.data.write import sha256_file, write_shards


def read_all(pattern: str) -> list[dict]:
    return list(wds.WebDataset(expand_shards(pattern), shardshuffle=False, empty_check=False))


def test_digits_round_trip(digits16):
    m = json.loads((digits16 / "manifest.json").read_text())
    assert (m["resolution"], m["channels"], m["num_classes"]) == (16, 1, 10)
    assert m["class_names"] == [str(i) for i in range(10)]
    train, hold = read_all(str(digits16 / "train-*.tar")), read_all(str(digits16 / "holdout-*.tar"))
    assert len(train) == m["splits"]["train"]["count"] and len(hold) == m["splits"]["holdout"]["count"] == 180
    assert len(train) + len(hold) + m["duplicates_dropped_from_train"] == 1797
    for split in ("train", "holdout"):
        for s in m["splits"][split]["shards"]:
            assert sha256_file(digits16 / s["name"]) == s["sha256"]
            assert len(read_all(str(digits16 / s["name"]))) == s["count"]
    labels = {int(s["cls"]) for s in train}
    assert labels == set(range(10))
    # held out and train share no image: neither a source index nor the same pixels
    assert not {s["__key__"] for s in train} & {s["__key__"] for s in hold}
    pix = lambda s: hashlib.sha256(Image.open(io.BytesIO(s["png"])).tobytes()).hexdigest()
    assert not {pix(s) for s in train} & {pix(s) for s in hold}
    img = Image.open(io.BytesIO(train[0]["png"]))
    assert img.size == (16, 16) and img.mode == "L"


def test_duplicates_never_cross_the_split(tmp_path):
    arr = np.zeros((20, 8, 8), np.uint8)
    arr[:10] = 255  # two groups of identical images
    np.savez(tmp_path / "dups.npz", images=arr)
    m = write_shards(str(tmp_path / "dups.npz"), tmp_path / "out", resolution=8, holdout=0.5, shard_size=100)
    assert m["splits"]["train"]["count"] + m["duplicates_dropped_from_train"] == 10
    assert m["splits"]["train"]["count"] == 0  # both kinds of image are in the held-out half


def _png(color, size=(12, 10), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def test_folder_zip_and_npz_sources(tmp_path):
    root = tmp_path / "imgs"
    for cls, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (root / cls).mkdir(parents=True)
        for i in range(5):  # distinct images (identical ones would be deduplicated across the split)
            _png((color[0], 20 * i, color[2])).save(root / cls / f"{i}.png")
    m = write_shards(str(root), tmp_path / "from_dir", resolution=8, holdout=0.2, shard_size=3)
    assert (m["channels"], m["num_classes"], m["class_names"]) == (3, 2, ["cats", "dogs"])
    samples = read_all(str(tmp_path / "from_dir" / "train-*.tar")) + read_all(
        str(tmp_path / "from_dir" / "holdout-*.tar")
    )
    for s in samples:  # the label follows the folder: cats are red, dogs blue
        px = np.asarray(Image.open(io.BytesIO(s["png"])))[4, 4]
        assert (px[0] > px[2]) == (int(s["cls"]) == 0)

    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for p in root.rglob("*.png"):
            zf.write(p, p.relative_to(root))
    mz = write_shards(str(tmp_path / "imgs.zip"), tmp_path / "from_zip", resolution=8, holdout=0.2, shard_size=3)
    assert mz["num_classes"] == 2 and mz["splits"]["train"]["count"] + mz["splits"]["holdout"]["count"] == 10

    x = (np.random.default_rng(0).random((6, 3, 16, 16)) * 255).astype(np.uint8)  # N×C×H×W is accepted too
    np.savez(tmp_path / "x.npz", images=x, labels=np.array([0, 1, 2, 0, 1, 2]))
    mn = write_shards(str(tmp_path / "x.npz"), tmp_path / "from_npz", resolution=16, holdout=0.0, shard_size=4)
    assert (mn["channels"], mn["num_classes"], mn["splits"]["train"]["count"]) == (3, 3, 6)
    assert len(mn["splits"]["train"]["shards"]) == 2


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        write_shards(str(tmp_path / "nope"), tmp_path / "o", resolution=8)
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((2, 8, 8)))
    with pytest.raises(DataError, match=r"bad.npz: no image array.*found \['pictures'\]"):
        write_shards(str(tmp_path / "bad.npz"), tmp_path / "o", resolution=8)
    with pytest.raises(DataError, match="power of two"):
        write_shards("builtin:digits", tmp_path / "o", resolution=12)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as e:
        write_shards(str(tmp_path / "broken"), tmp_path / "o", resolution=8)
    assert str(e.value) == (
        f"no readable images (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp) in "
        f"{tmp_path / 'broken'}; skipped 1 file(s):\n"
        f"  x.png: not a readable image (cannot identify image file)"
    )
    assert not (tmp_path / "o").exists()


def _source_with_bad_files(root: Path) -> list[dict]:
    """Six good images in cats/ and dogs/, and bad files of each kind; returns the expected skipped list."""
    for cls, color in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            _png((color[0], 40 * i, color[2])).save(root / cls / f"{i}.png")
    noise = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    (root / "cats" / "fake.jpg").write_bytes(b"this is text, not a JPEG")
    (root / "dogs" / "cut.png").write_bytes(buf.getvalue()[:500])
    (root / "notes.txt").write_text("where the photos came from")
    (root / "dogs" / "LICENSE").write_text("CC-BY")
    return [
        {"file": "cats/fake.jpg", "reason": "not a readable image (cannot identify image file)"},
        {"file": "dogs/LICENSE", "reason": "not an image file (no extension)"},
        {"file": "dogs/cut.png", "reason": "not a readable image (image file is truncated)"},
        {"file": "notes.txt", "reason": "not an image file (extension .txt)"},
    ]


def _zip_of(root: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(root.rglob("*")):
            zf.write(p, p.relative_to(root))  # folders too: their entries are not files and are not listed
    return path


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_bad_files_are_skipped_and_listed_and_the_good_ones_written(tmp_path, kind):
    expected = _source_with_bad_files(tmp_path / "imgs")
    source = tmp_path / "imgs" if kind == "folder" else _zip_of(tmp_path / "imgs", tmp_path / "imgs.zip")
    m = write_shards(str(source), tmp_path / "out", resolution=8, holdout=0.2, shard_size=4)
    assert m["skipped"] == expected
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == expected
    assert (m["num_classes"], m["class_names"]) == (2, ["cats", "dogs"])
    samples = read_all(str(tmp_path / "out" / "train-*.tar")) + read_all(str(tmp_path / "out" / "holdout-*.tar"))
    written = sorted(s["src.txt"].decode() for s in samples)
    assert written == [f"{c}/{i}.png" for c in ("cats", "dogs") for i in range(3)]


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_strict_names_every_bad_file_and_writes_nothing(tmp_path, kind):
    expected = _source_with_bad_files(tmp_path / "imgs")
    source = tmp_path / "imgs" if kind == "folder" else _zip_of(tmp_path / "imgs", tmp_path / "imgs.zip")
    old = write_shards("builtin:digits", tmp_path / "out", resolution=8, shard_size=1000)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(DataError) as e:
        write_shards(str(source), tmp_path / "out", resolution=8, strict=True)
    assert str(e.value) == (
        f"{source}: 4 file(s) are not readable images, so nothing was written (--strict):"
        + "".join(f"\n  {f['file']}: {f['reason']}" for f in expected)
        + "\nremove or fix them, or leave out --strict to skip them"
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # the old shards are intact
    assert old["splits"]["train"]["count"] > 0
    with pytest.raises(DataError):
        write_shards(str(source), tmp_path / "new", resolution=8, strict=True)
    assert not (tmp_path / "new").exists()


def test_npz_labels_outside_the_classes_are_refused(tmp_path):
    x = np.zeros((6, 8, 8), np.uint8)
    np.savez(tmp_path / "neg.npz", images=x, labels=np.array([0, 1, 2, -1, 1, -3]))
    with pytest.raises(DataError) as e:
        write_shards(str(tmp_path / "neg.npz"), tmp_path / "o", resolution=8)
    assert str(e.value) == (
        f"{tmp_path / 'neg.npz'}: labels[3] is -1, outside [0, 3) (classes 0 to the largest "
        f"label) (and 1 more); labels must be class indices"
    )
    np.savez(tmp_path / "named.npz", images=x, y=np.array([0, 1, 0, 1, 2, 1]), class_names=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"named.npz: y\[4\] is 2, outside \[0, 2\) \(2 class_names\); labels must"):
        write_shards(str(tmp_path / "named.npz"), tmp_path / "o", resolution=8)
    assert not (tmp_path / "o").exists()


def test_missing_shards_fail_at_start(tmp_path):
    with pytest.raises(DataError, match=r"no shard matches .*ganforge data shards"):
        expand_shards(str(tmp_path / "train-*.tar"))
    with pytest.raises(DataError, match=r"shard .*train-000008.tar does not exist"):
        expand_shards(str(tmp_path / "train-{000008..000009}.tar"))


def test_brace_and_pipe_urls_stream(digits16):
    urls = expand_shards(str(digits16 / "train-{000000..000001}.tar"))
    assert len(urls) == 2
    spec = ImageSpec(16, 1, 10)
    pipe = [f"pipe:cat {u}" for u in urls]
    a = next(iter(ShardStream(urls, spec, 8, seed=1)))
    b = next(iter(ShardStream(pipe, spec, 8, seed=1)))
    assert a.keys == b.keys and torch.equal(a.img, b.img)


def test_manifest_and_config_must_agree(digits16):
    cfg = DataConfig(shards=str(digits16 / "train-*.tar"))
    assert image_spec(cfg, load_manifest(cfg)) == ImageSpec(16, 1, 10)
    cfg = DataConfig(shards=str(digits16 / "train-*.tar"), resolution=32)
    with pytest.raises(DataError, match="data.resolution is 32 but the shards' manifest says 16"):
        image_spec(cfg, load_manifest(cfg))


def test_batches_are_images_in_range_with_labels(digits16):
    s = ShardStream(expand_shards(str(digits16 / "train-*.tar")), ImageSpec(16, 1, 10), 32, seed=0)
    b = next(iter(s))
    assert b.img.shape == (32, 1, 16, 16) and b.img.dtype == torch.float32
    assert -1.0 <= b.img.min() and b.img.max() <= 1.0 and b.img.min() == -1.0
    assert b.label.dtype == torch.long and 0 <= b.label.min() and b.label.max() < 10 and not b.bad


def test_ranks_and_workers_read_disjoint_shards(digits16):
    urls = expand_shards(str(digits16 / "train-*.tar"))
    total = sum(s["count"] for s in json.loads((digits16 / "manifest.json").read_text())["splits"]["train"]["shards"])
    seen: dict[tuple[int, int], set[str]] = {}
    for rank in range(2):
        for role in range(2):
            stream = ShardStream(
                urls, ImageSpec(16, 1, 10), 1, seed=3, rank=rank, world_size=2, num_roles=2, role_offset=role
            )  # without DataLoader workers, the offset picks the role
            keys = set()
            for b in stream:
                if b.cursor[0] > 0:  # first epoch only
                    break
                keys.update(b.keys)
            seen[rank, role] = keys
    parts = list(seen.values())
    assert all(parts) and sum(len(p) for p in parts) == total
    assert len(set().union(*parts)) == total  # disjoint and complete within an epoch


def test_too_few_shards_for_the_readers(digits16):
    urls = expand_shards(str(digits16 / "holdout-*.tar"))
    with pytest.raises(DataError, match=r"2 shard\(s\) cannot feed 2 rank\(s\) × 2 loader worker\(s\)"):
        ShardStream(urls, ImageSpec(16, 1, 10), 4, seed=0, world_size=2, num_roles=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly(digits16, workers):
    cfg = DataConfig(shards=str(digits16 / "train-*.tar"), workers=workers, shuffle_buffer=50)
    spec = ImageSpec(16, 1, 10)
    ref = ShardLoader(cfg, spec, 24, seed=5)
    expected = [ref.next().keys for _ in range(80)]  # crosses several epochs (1617 images / 24)
    first = ShardLoader(cfg, spec, 24, seed=5)
    for _ in range(37):
        first.next()
    state = first.state_dict()
    second = ShardLoader(cfg, spec, 24, seed=5)
    second.load_state_dict(state)
    assert [second.next().keys for _ in range(43)] == expected[37:]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_decode_with_one_thread(digits16, workers):
    """Loader workers run torch with one intra-op thread, whatever the training process uses; without workers
    the training process decodes with its own threads."""
    cfg = DataConfig(shards=str(digits16 / "train-*.tar"), workers=workers, shuffle_buffer=50)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = ShardLoader(cfg, ImageSpec(16, 1, 10), 8, seed=0)
        batches = [loader.next() for _ in range(4)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert {b.role for b in batches} == set(range(max(1, workers)))
    assert [b.threads for b in batches] == [1 if workers else 2] * 4


def _write_bad_shard(path: Path) -> None:
    good = io.BytesIO()
    Image.new("L", (16, 16), 128).save(good, format="PNG")
    wrong = io.BytesIO()
    Image.new("RGB", (8, 8)).save(wrong, format="PNG")
    with wds.TarWriter(str(path)) as w:
        for i in range(10):
            w.write({"__key__": f"good{i}", "png": good.getvalue(), "cls": 3})
        w.write({"__key__": "garbage", "png": b"\x89PNG not really", "cls": 1})
        w.write({"__key__": "wrongsize", "png": wrong.getvalue(), "cls": 1})
        w.write({"__key__": "badlabel", "png": good.getvalue(), "cls": 42})
        w.write({"__key__": "nolabel", "png": good.getvalue()})


def test_corrupt_members_are_skipped_and_counted(tmp_path):
    shard = tmp_path / "train-000000.tar"
    _write_bad_shard(shard)
    it = iter(ShardStream([str(shard)], ImageSpec(16, 1, 10), 10, seed=0, shuffle_buffer=1))
    batches = [next(it) for _ in range(3)]  # one batch per epoch: the 10 good samples
    for b in batches:
        assert b.img.shape[0] == 10 and set(b.keys) == {f"good{i}" for i in range(10)}
    # the bad samples are read after an epoch's last batch: they ride on the next epoch's first batch
    assert batches[0].bad == []
    for b in batches[1:]:
        assert sorted(b.bad) == sorted(
            [
                (str(shard), "garbage", "not an image: UnidentifiedImageError"),
                (str(shard), "wrongsize", "RGB 8×8, expected L 16×16"),
                (str(shard), "badlabel", "label 42 out of range [0, 10)"),
                (str(shard), "nolabel", "missing or unreadable label"),
            ]
        )
    health = DataHealth(max_bad_fraction=1.0, min_samples=1)
    for b in batches:
        health.update(b)
    assert health.bad == 8 and health.bad_by_shard == {str(shard): 8} and health.read == 8 + 10 * len(batches)


def test_too_many_bad_samples_stop_with_the_worst_shard(tmp_path):
    _write_bad_shard(tmp_path / "train-000000.tar")
    cfg = DataConfig(
        shards=str(tmp_path / "train-*.tar"),
        workers=0,
        max_bad_fraction=0.1,
        min_samples_for_bad_check=10,
        shuffle_buffer=1,
    )
    loader = ShardLoader(cfg, ImageSpec(16, 1, 10), 10, seed=0)
    with pytest.raises(
        DataError, match=r"samples were bad \(> data.max_bad_fraction=0.1\); worst shards: .*train-000000.tar"
    ):
        for _ in range(5):
            loader.next()


def test_truncated_tar_is_survived(tmp_path, digits16):
    src = digits16 / "train-000000.tar"
    data = src.read_bytes()
    (tmp_path / "train-000000.tar").write_bytes(data[: len(data) // 2])  # cut mid-member
    (tmp_path / "train-000001.tar").write_bytes((digits16 / "train-000001.tar").read_bytes())
    urls = expand_shards(str(tmp_path / "train-*.tar"))
    stream = ShardStream(urls, ImageSpec(16, 1, 10), 16, seed=0, shuffle_buffer=1)
    keys, bad = set(), []
    for b in stream:
        bad += b.bad
        if b.cursor[0] > 0:
            break
        keys.update(b.keys)
    assert {s["__key__"] for s in read_all(str(digits16 / "train-000001.tar"))} <= keys  # the next shard is read
    assert len(keys) > 128  # and so are the samples before the cut
    cut = str(tmp_path / "train-000000.tar")
    assert bad, "a cut-off shard must be reported"
    assert all(shard == cut and reason.startswith(("unreadable:", "truncated:")) for shard, _, reason in bad), bad


def test_mirror_doubles_the_data_with_flipped_images_and_the_same_labels(digits16):
    """data.mirror: an epoch holds every sample and its x-flip (key ``<key>:mirror``), labels kept."""
    urls = expand_shards(str(digits16 / "train-00000[01].tar"))
    spec = ImageSpec(16, 1, 10)

    def first_epoch(mirror: bool) -> dict[str, tuple[torch.Tensor, int]]:
        out = {}
        for b in ShardStream(urls, spec, 1, seed=0, mirror=mirror):
            if b.cursor[0] > 0:
                return out
            out[b.keys[0]] = (b.img[0], int(b.label[0]))

    plain, mirrored = first_epoch(False), first_epoch(True)
    assert len(mirrored) == 2 * len(plain) == 2 * 256
    for key, (img, label) in plain.items():
        assert torch.equal(mirrored[key][0], img) and mirrored[key][1] == label
        assert torch.equal(mirrored[f"{key}:mirror"][0], torch.flip(img, dims=[2]))
        assert mirrored[f"{key}:mirror"][1] == label
    asymmetric = [k for k, (img, _) in plain.items() if not torch.equal(img, torch.flip(img, dims=[2]))]
    assert len(asymmetric) > 200  # the flip is visible on real digits


def test_max_train_keeps_a_small_training_split_and_the_whole_holdout(tmp_path):
    full = write_shards("builtin:digits", tmp_path / "full", resolution=8, shard_size=100)
    small = write_shards("builtin:digits", tmp_path / "small", resolution=8, shard_size=100, max_train=160)
    assert small["splits"]["train"]["count"] == 160 and small["max_train"] == 160
    assert small["splits"]["holdout"]["count"] == full["splits"]["holdout"]["count"] == 180
    assert small["duplicates_dropped_from_train"] == full["duplicates_dropped_from_train"]
