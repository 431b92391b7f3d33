"""The ``ganforge`` command: train, generate, report, eval, extractor train, weights get, data shards / pairs /
unpaired / superres, info, import.

Thin: parse, then call the orchestrator."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path


def _train(a: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.train.run import train

    cfg = load_config(a.config, a.set)
    if a.init_from is not None:
        cfg.finetune.init_from = a.init_from
    run_dir = Path(a.run_dir or Path("runs") / Path(a.config).stem)
    result = train(cfg, run_dir, resume=a.resume)
    how = "stopped on request (SIGTERM or STOP file; continue with --resume auto)" if result.preempted else "finished"
    print(f"\n{how} at step {result.step} ({result.nimg / 1000:.1f} kimg)")
    print(f"  checkpoint:  {result.checkpoint}")
    print(f"  sample grid: {result.grid}")
    print(f"  config:      {result.config}")
    print(f"  W&B run:     {result.wandb_dir or 'disabled'}")
    rows = [row for row in result.evaluations if "eval/fid" in row]  # this run's line, not abandoned branches
    if rows:
        print(
            f"  FID ({rows[0]['feature_extractor']} features, held-out data): {rows[0]['eval/fid']:.1f} at step "
            f"{rows[0]['step']}, {rows[-1]['eval/fid']:.1f} at step {rows[-1]['step']}; all in {run_dir / 'eval.jsonl'}"
        )
    return 0


def _generate(a: argparse.Namespace) -> int:
    from orchestrator.tools.generate import generate, interpolate, translate

    if a.input is not None:
        if a.seeds is not None or a.num is not None or a.seed is not None or a.interpolate is not None:
            a.parser.error("--input translates images; leave out --seeds, --num, --seed and --interpolate")
        paths = translate(a.checkpoint, a.input, a.out, a.direction, a.device)
        print(f"wrote {len(paths) - 1} images and {paths[-1]}")
        return 0
    if a.interpolate is not None:
        if a.seeds is not None or a.num is not None or a.seed is not None:
            a.parser.error("--interpolate takes its two seeds itself; leave out --seeds, --num and --seed")
        seed_a, seed_b = a.interpolate
        paths = interpolate(
            a.checkpoint,
            a.out,
            seed_a,
            seed_b,
            steps=8 if a.steps is None else a.steps,
            truncation=a.truncation,
            class_index=a.class_index,
            space=a.space,
            device=a.device,
            frame_ms=a.frame_ms,
        )
        print(f"wrote {len(paths) - 2} frames, the strip {paths[-2]} and the animation {paths[-1]}")
        return 0
    if a.seeds is not None and (a.num is not None or a.seed is not None):
        a.parser.error("use either --seeds or --seed/--num, not both")
    if a.steps is not None or a.space != "auto":
        a.parser.error("--steps and --space go with --interpolate")
    paths = generate(
        a.checkpoint,
        a.out,
        16 if a.num is None else a.num,
        seed=a.seed or 0,
        truncation=a.truncation,
        class_index=a.class_index,
        device=a.device,
        seeds=a.seeds,
    )
    print(f"wrote {len(paths) - 1} images and {paths[-1]}")
    return 0


def _seeds(text: str) -> list[int]:
    from orchestrator.tools.generate import seeds_arg  # imported when used: torch is slow to import for --help

    return seeds_arg(text)


def _seed_pair(text: str) -> tuple[int, int]:
    from orchestrator.tools.generate import seed_pair_arg

    return seed_pair_arg(text)


def _report(a: argparse.Namespace) -> int:
    from orchestrator.tools.report import ReportError, write_report

    try:
        r = write_report(a.run_dir, a.out, max_grids=a.max_grids)
    except ReportError as e:
        print(f"ganforge report: error: {e}", file=sys.stderr)
        return 2
    grids = f"{len(r.grids)} of {r.grids_total}" if len(r.grids) < r.grids_total else str(len(r.grids))
    real = ", the real-image grid" if r.real_grid else ""
    print(f"wrote {len(r.plots)} plots ({r.rows} logged steps), {grids} sample grids{real} and {r.index}")
    return 0


def _shards(a: argparse.Namespace) -> int:
    from orchestrator.data.write import write_shards

    m = write_shards(
        a.source,
        a.out,
        a.resolution,
        holdout=a.holdout,
        shard_size=a.shard_size,
        channels=a.channels,
        seed=a.seed,
        strict=a.strict,
        max_train=a.max_train,
    )
    s = m["splits"]
    print(
        f"wrote {s['train']['count']} training images in {len(s['train']['shards'])} shard(s) and "
        f"{s['holdout']['count']} held-out images in {len(s['holdout']['shards'])} shard(s) to {a.out} "
        f"({m['resolution']}×{m['resolution']}, {m['channels']} channel(s), {m['num_classes']} classes)"
    )
    if m["skipped"]:
        print(f"skipped {len(m['skipped'])} file(s) that are not readable images (also listed in manifest.json):")
        for f in m["skipped"]:
            print(f"  {f['file']}: {f['reason']}")
    return 0


def _print_skipped(m: dict) -> None:
    """The files a shard writer skipped, with their reasons (as in manifest.json)."""
    if not m["skipped"]:
        return
    print(f"skipped {len(m['skipped'])} file(s) (also listed in manifest.json):")
    for f in m["skipped"]:
        print(f"  {f['source']}: {f['file']}: {f['reason']}")


def _shape(m: dict, res: str = "resolution", ch: str = "channels") -> str:
    return f"{m[res]}×{m[res]}×{m[ch]}"


def _pairs(a: argparse.Namespace) -> int:
    from orchestrator.data.write import write_pairs

    m = write_pairs(
        a.source_a,
        a.source_b,
        a.out,
        a.resolution,
        a.input_resolution,
        holdout=a.holdout,
        shard_size=a.shard_size,
        seed=a.seed,
        max_train=a.max_train,
    )
    s = m["splits"]
    unmatched = [f for f in m["skipped"] if f["reason"].startswith("no counterpart")]
    print(
        f"wrote {s['train']['count']} training pairs and {s['holdout']['count']} held-out pairs to {a.out} "
        f"(input {_shape(m, 'input_resolution', 'input_channels')} → target {_shape(m)}, "
        f"{m['num_classes']} classes); {len(unmatched)} file(s) had no counterpart"
    )
    _print_skipped(m)
    return 0


def _unpaired(a: argparse.Namespace) -> int:
    from orchestrator.data.write import write_unpaired

    m = write_unpaired(
        a.source_a,
        a.source_b,
        a.out,
        a.resolution,
        a.input_resolution,
        holdout=a.holdout,
        shard_size=a.shard_size,
        seed=a.seed,
        max_train=a.max_train,
    )
    c = {k: v["count"] for k, v in m["splits"].items()}
    print(
        f"wrote domain A ({_shape(m, 'input_resolution', 'input_channels')}): {c['train-a']} training and "
        f"{c['holdout-a']} held-out images, domain B ({_shape(m)}): {c['train-b']} training and "
        f"{c['holdout-b']} held-out images to {a.out}"
    )
    if m["shared_keys_split"]:
        print(f"{m['shared_keys_split']} key(s) were in both sources: each went to one domain only")
    _print_skipped(m)
    return 0


def _superres(a: argparse.Namespace) -> int:
    from orchestrator.data.write import write_superres

    m = write_superres(
        a.source,
        a.out,
        a.resolution,
        a.crop,
        a.scale,
        holdout=a.holdout,
        shard_size=a.shard_size,
        seed=a.seed,
        max_train=a.max_train,
    )
    s = m["splits"]
    print(
        f"wrote {s['train']['count']} training images ({m['stored_resolution']} px, cropped to {m['resolution']} "
        f"at random when read) and {s['holdout']['count']} held-out {m['resolution']} px tiles of "
        f"{m['holdout_images']} image(s) to {a.out}; inputs are {m['input_resolution']} px (×{m['scale']} bicubic)"
    )
    _print_skipped(m)
    return 0


def _info(a: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    import architectures
    from architectures.registry import count_params
    from orchestrator.config import load_config
    from orchestrator.data.shards import image_spec, load_manifest

    cfg = load_config(a.config, a.set)
    spec = image_spec(cfg.data, load_manifest(cfg.data))
    arch = architectures.get(cfg.model.arch)
    d_spec = replace(spec, channels=spec.channels * cfg.loss.pack)  # PacGAN's D takes m images at once
    with torch.device("meta"):  # shapes and counts without allocating or computing anything
        G, D = arch.build_generator(cfg.model, spec), arch.build_discriminator(cfg.model, d_spec)
        if arch.capabilities.conditioning == "image":  # G(x); each family's D has its own call (its recipe's)
            out_shape = list(G(torch.zeros(1, spec.input_channels, spec.input_resolution, spec.input_resolution)).shape)
            d_shape = None
        else:
            z = torch.zeros(1, G.z_dim)
            c = torch.zeros(1, dtype=torch.long) if spec.num_classes else None
            out_shape = list(G(z, c).shape)
            d_shape = list(D(torch.zeros([cfg.loss.pack, *out_shape[1:]]).view(1, -1, *out_shape[2:]), c).shape)
    info = {
        "config": cfg.model_dump(mode="json"),
        "arch": cfg.model.arch,
        "g_params": count_params(G),
        "d_params": count_params(D),
        "output_shape": out_shape,
        "d_output_shape": d_shape,
        "image": {"resolution": spec.resolution, "channels": spec.channels, "num_classes": spec.num_classes},
    }
    extra, note = arch.param_notes(G, D) if arch.param_notes else ({}, "")
    info.update(extra)
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        print(cfg.to_yaml())
        print(
            f"# {cfg.model.arch}: G {info['g_params']:,} trainable parameters, D {info['d_params']:,}; "
            f"G output {out_shape}"
        )
        if note:
            print(f"# {note}")
    return 0


def _eval(a: argparse.Namespace) -> int:
    from orchestrator.eval.evaluator import eval_config_for, evaluate_checkpoint

    cfg = eval_config_for(
        a.checkpoint,
        metrics=a.metrics,
        num_samples=a.num,
        seed=a.seed,
        batch_size=a.batch_size,
        truncation_psi=a.truncation,
        feature_extractor=a.feature_extractor,
        weights_path=a.weights,
        cache_dir=a.cache_dir,
        holdout_num=a.holdout_num,
        kid_subset_size=a.kid_subset_size,
    )
    r = evaluate_checkpoint(a.checkpoint, cfg, holdout=a.data, device=a.device, verbose=a.verbose)
    if a.json:
        print(json.dumps({"checkpoint": str(Path(a.checkpoint).resolve()), **r.to_dict()}, indent=2))
        return 0
    for key, value in r.metrics.items():
        print(f"{key:10s} {value:.6g}")
    held = (
        "not needed"
        if r.cache_hit is None
        else f"{r.num_holdout} images; features {'reused from' if r.cache_hit else 'computed and saved to'} the cache "
        f"({r.cache_key} in {Path(cfg.cache_dir).expanduser()})"
    )
    print(
        f"# {r.num_generated} images from G_ema (seeds {cfg.seed}-{cfg.seed + r.num_generated - 1}"
        f"{f', ψ={cfg.truncation_psi}' if cfg.truncation_psi is not None else ''}); held-out: {held}"
    )
    print(f"# feature extractor {r.feature_extractor} (weights sha256 {r.weights_sha256[:12]}…); {r.seconds:.1f} s")
    for note in r.notes:
        print(f"# {note}")
    return 0


def _extractor_train(a: argparse.Namespace) -> int:
    import os

    from orchestrator.eval.extractors import NAME, train_feature_extractor

    holdout = a.holdout
    if holdout is None:
        beside = Path(os.path.dirname(a.data) or ".") / "holdout-*.tar"
        holdout = str(beside) if list(beside.parent.glob(beside.name)) else None
    r = train_feature_extractor(
        a.data,
        a.out,
        epochs=a.epochs,
        holdout_shards=holdout,
        batch_size=a.batch_size,
        lr=a.lr,
        feature_dim=a.feature_dim,
        seed=a.seed,
        device=a.device,
        log=None if a.json else print,
    )
    if a.json:
        print(
            json.dumps(
                {
                    "path": str(r.path),
                    "train_accuracy": r.train_accuracy,
                    "holdout_accuracy": r.holdout_accuracy,
                    "num_train": r.num_train,
                    "num_holdout": r.num_holdout,
                    "num_classes": r.num_classes,
                    "seconds": r.seconds,
                },
                indent=2,
            )
        )
        return 0
    held = f", held-out {r.holdout_accuracy:.1%} of {r.num_holdout}" if r.holdout_accuracy is not None else ""
    print(
        f"wrote {r.path}: {r.num_classes}-class classifier, accuracy train {r.train_accuracy:.1%}{held} "
        f"({r.seconds:.0f} s)"
    )
    print(f"evaluate with: ganforge eval CHECKPOINT --feature-extractor {NAME} --weights {r.path}")
    return 0


def _weights_get(a: argparse.Namespace) -> int:
    from orchestrator.eval.weights import get

    d = get(a.name, url=a.url, sha256=a.sha256, progress=not a.no_progress)
    if d.already_there:
        print(f"{d.path} is already there (sha256 {d.sha256} verified)")
    else:
        resumed = f", resumed at byte {d.resumed_from:,}" if d.resumed_from else ""
        print(f"wrote {d.path} ({d.fetched:,} bytes fetched{resumed}; sha256 {d.sha256} verified)")
    print("ganforge eval and training use it when eval.weights_path and $GANFORGE_INCEPTION_WEIGHTS are not set")
    return 0


def _submit(a: argparse.Namespace) -> int:
    from launch.submit import submit

    return submit(a.config, a.address, a.set, a.run_dir, working_dir=a.working_dir, follow=not a.no_wait)


def _add_train(sub, overrides: dict) -> None:
    """The ``train`` subcommand."""
    t = sub.add_parser(
        "train", help="train a GAN from a YAML config", description="Train (or resume) a GAN from a YAML config."
    )
    t.add_argument("config", help="YAML config, e.g. configs/dev/dcgan-digits.yaml")
    t.add_argument("--set", **overrides)
    t.add_argument(
        "--run-dir", help="where checkpoints, samples, logs and the W&B run go (default: runs/<config name>)"
    )
    t.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="'auto': continue from the newest complete checkpoint in "
        "the run directory (fresh if none); PATH: from that checkpoint directory",
    )
    t.add_argument(
        "--init-from",
        metavar="CKPT",
        help="fine-tune: a new run (counters at 0) starting from this checkpoint's G, D and G_ema "
        "(finetune.init_from; finetune.init_partial: true keeps what fits and initialises the rest)",
    )
    t.set_defaults(fn=_train)


def _add_generate(sub) -> None:
    """The ``generate`` subcommand."""
    g = sub.add_parser(
        "generate",
        help="sample images from a checkpoint's G_ema",
        description="Write one PNG per seed and a grid, or a latent interpolation between two seeds "
        "(frames, a strip and an animated GIF), from a checkpoint's G_ema. Every image "
        "is labelled as synthetic in its metadata, with its checkpoint, step, seed, ψ "
        "and class. A seed always gives the same image.",
    )
    g.add_argument("checkpoint", help="a checkpoint directory (runs/NAME/checkpoints/ckpt-NNNNNNNNN)")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument(
        "--seeds",
        type=_seeds,
        metavar="LIST",
        help="seeds to render, e.g. 0-63 or 0-3,7,10-12 "
        "(instead of --seed/--num); writes seedNNNN.png for each and grid.png",
    )
    g.add_argument("--num", type=int, help="number of images, seeds SEED … SEED+NUM-1 (default 16)")
    g.add_argument("--seed", type=int, help="first seed; image i uses seed SEED+i (default 0)")
    g.add_argument(
        "--truncation",
        type=float,
        metavar="PSI",
        help="truncation ψ (mapping-network generators: w_avg + ψ(w − w_avg); biggan: resample |z| > ψ)",
    )
    g.add_argument(
        "--class",
        dest="class_index",
        type=int,
        metavar="INDEX",
        help="class to sample (conditional models; default: drawn from each image's seed)",
    )
    g.add_argument(
        "--interpolate",
        type=_seed_pair,
        metavar="SEED_A,SEED_B",
        help="interpolate between two seeds' latents instead: writes interp-A-B-NN.png frames, the strip "
        "interp-A-B.png and interp-A-B.gif (conditional models also need --class)",
    )
    g.add_argument("--steps", type=int, metavar="K", help="frames of the interpolation, ends included (default 8)")
    g.add_argument(
        "--space",
        choices=("auto", "z", "w"),
        default="auto",
        help="interpolate by slerp in Z, or linearly in W (mapping-network generators, the StyleGAN "
        "convention); default auto: W where there is a mapping network, else Z",
    )
    g.add_argument("--frame-ms", type=int, default=100, metavar="MS", help="GIF frame duration (default 100)")
    g.add_argument(
        "--input",
        metavar="PATH",
        help="image → image models (pix2pix, cyclegan, srgan): translate this image or every image of this "
        "folder instead; writes NAME.png per input and grid.png (input | output)",
    )
    g.add_argument(
        "--direction", choices=("ab", "ba"), default="ab", help="cyclegan: ab (A → B, default) or ba (B → A)"
    )
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.set_defaults(fn=_generate, parser=g)


def _add_report(sub) -> None:
    """The ``report`` subcommand."""
    r = sub.add_parser(
        "report",
        help="plots and an HTML page of a run (no W&B needed)",
        description="Write loss, discriminator, regularizer, throughput and evaluator plots of a run's "
        "metrics.jsonl (FID and KID on a log axis) and one self-contained page, "
        "report/index.html (images embedded: mail or copy it alone), with the real-image "
        "grid beside the sample grids over time, the evaluator's metrics by step and the "
        "resolved config.",
    )
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/NAME)")
    r.add_argument("--out", help="output directory (default RUN_DIR/report)")
    r.add_argument(
        "--max-grids",
        type=int,
        default=24,
        metavar="N",
        help="embed at most N sample grids, evenly spaced over training, first and last included (default 24)",
    )
    r.set_defaults(fn=_report)


def _add_data(sub) -> None:
    """The ``data`` subcommand."""
    d = sub.add_parser("data", help="prepare data", description="Prepare data for training.")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser(
        "shards",
        help="write WebDataset shards from images",
        description="Write train-NNNNNN.tar and holdout-NNNNNN.tar shards and manifest.json from an image "
        "folder (class labels from subfolders), a .zip of one, an .npz (images, labels) or "
        "builtin:digits (scikit-learn's handwritten digits).",
    )
    s.add_argument("source", help="folder, .zip, .npz or a built-in (builtin:digits, builtin:stacked-digits, …)")
    s.add_argument("out", help="output directory")
    s.add_argument("--resolution", type=int, required=True, help="square output size in pixels (a power of two)")
    s.add_argument("--holdout", type=float, default=0.1, help="fraction held out for evaluation (default 0.1)")
    s.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    s.add_argument(
        "--channels", type=int, choices=(1, 3), help="1 (grey) or 3 (RGB); default: grey only if every image is"
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the train/held-out split (default 0)")
    s.add_argument(
        "--max-train",
        type=int,
        metavar="N",
        help="keep only N training images (small-data experiments; the held-out split stays whole)",
    )
    s.add_argument(
        "--strict",
        action="store_true",
        help="fail, writing nothing, if any file of SOURCE is not a "
        "readable image (default: skip such files and list them at the end)",
    )
    s.set_defaults(fn=_shards)
    _add_translation_data(dsub)


def _common_split_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--holdout", type=float, default=0.1, help=f"fraction of {what} held out (default 0.1)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/held-out split (default 0)")
    p.add_argument("--max-train", type=int, metavar="N", help=f"keep only N training {what}")


def _add_translation_data(dsub) -> None:
    """``data pairs``, ``data unpaired`` and ``data superres``: image-to-image shards."""
    sources = "folders, .zips, .npz files or built-ins (builtin:digits, builtin:digits-edges, builtin:digits-m, "
    sources += "builtin:photos)"
    for name, fn, text in (
        (
            "pairs",
            _pairs,
            "Write paired shards (Pix2Pix): SOURCE_A is the input, SOURCE_B the target, matched by relative "
            "path without extension (keys for built-ins); files without a counterpart are skipped and listed. "
            f"Sources: {sources}.",
        ),
        (
            "unpaired",
            _unpaired,
            "Write unpaired shards (CycleGAN): train-a-*/holdout-a-* (domain A, the input) and "
            "train-b-*/holdout-b-* (domain B). Items in both sources go to one domain only. "
            f"Sources: {sources}.",
        ),
    ):
        p = dsub.add_parser(name, help=f"write {name} image-to-image shards", description=text)
        p.add_argument("source_a", metavar="SOURCE_A", help="domain A / the input images")
        p.add_argument("source_b", metavar="SOURCE_B", help="domain B / the target images")
        p.add_argument("out", help="output directory")
        p.add_argument("--resolution", type=int, required=True, help="size of B's images (a power of two)")
        p.add_argument("--input-resolution", type=int, help="size of A's images (default: --resolution)")
        _common_split_options(p, "pairs" if name == "pairs" else "images per domain")
        p.set_defaults(fn=fn)
    p = dsub.add_parser(
        "superres",
        help="write super-resolution shards",
        description="Write super-resolution shards: whole training images at --resolution (cropped to --crop at "
        "random when read) and held-out images cut into fixed --crop tiles. The low-resolution input is made "
        f"when reading, by bicubic downscaling by --scale. Source: {sources.replace('folders', 'a folder')}.",
    )
    p.add_argument("source", help="folder, .zip, .npz or a built-in (builtin:photos)")
    p.add_argument("out", help="output directory")
    p.add_argument("--resolution", type=int, required=True, help="stored image size (a power of two), e.g. 256")
    p.add_argument("--crop", type=int, required=True, help="size of the crops G outputs, e.g. 64")
    p.add_argument("--scale", type=int, default=4, help="upscaling factor: inputs are crop/scale px (default 4)")
    _common_split_options(p, "images")
    p.set_defaults(fn=_superres)


def _add_submit(sub, overrides: dict) -> None:
    """The ``submit`` subcommand."""
    u = sub.add_parser(
        "submit",
        help="run a training job on a Ray cluster (like ray job submit)",
        description="Submit `python -m launch.ray_job CONFIG ...` to a Ray cluster through its job API, "
        "stream the job's logs, and exit 0 only if the job SUCCEEDED.",
    )
    u.add_argument("config", help="YAML config (a path inside the working directory)")
    u.add_argument("--address", required=True, help="the cluster's job API, e.g. http://127.0.0.1:8265")
    u.add_argument("--set", **overrides)
    u.add_argument(
        "--run-dir", help="absolute run directory on storage the workers see (default: ~/ganforge/runs/<config name>)"
    )
    u.add_argument("--working-dir", default=".", help="directory uploaded as the job's working directory (default .)")
    u.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the logs")
    u.set_defaults(fn=_submit)


def _add_info(sub, overrides: dict) -> None:
    """The ``info`` subcommand."""
    i = sub.add_parser(
        "info",
        help="show a config's resolved values and network sizes",
        description="Print the resolved config, G and D trainable parameter counts and output shape.",
    )
    i.add_argument("config", help="YAML config")
    i.add_argument("--set", **overrides)
    i.add_argument("--json", action="store_true", help="one JSON object (keys include g_params, d_params) for scripts")
    i.set_defaults(fn=_info)


def _add_eval(sub) -> None:
    """The ``eval`` subcommand."""
    e = sub.add_parser(
        "eval",
        help="FID, KID, IS, precision/recall of a checkpoint's G_ema on held-out shards",
        description="Evaluate a checkpoint's G_ema against held-out shards with torch-fidelity, the "
        "same code the evaluator runs during training. Image i is generated from seed "
        "SEED+i. Held-out features are cached (key: the shards' sha256, the feature "
        "extractor and its weights' sha256) and reused on later runs. Nothing is "
        "downloaded: Inception weights come from --weights, $GANFORGE_INCEPTION_WEIGHTS "
        "or the cache that `ganforge weights get inception` fills. "
        "Options left out take the run's eval settings, else the defaults.",
    )
    e.add_argument("checkpoint", help="a checkpoint directory (runs/NAME/checkpoints/ckpt-NNNNNNNNN)")
    e.add_argument(
        "--data",
        metavar="PATTERN",
        help="held-out shards, e.g. 'DIR/holdout-*.tar' (quote it; default: "
        "the run's eval.holdout or data.holdout, else holdout-*.tar beside its training shards)",
    )
    e.add_argument(
        "--metrics",
        metavar="LIST",
        help="comma-separated: fid, kid, isc (Inception Score), prc (precision/recall); default fid,kid. "
        "Image-to-image checkpoints: psnr, ssim, psnr_bicubic, ssim_bicubic (super-resolution); l1, l1_input, "
        "psnr, fid (paired); fid_a, fid_b, label_ab, label_ba, label_aba (unpaired); default: all that fit",
    )
    e.add_argument("--num", type=int, metavar="N", help="images to generate (default 10000)")
    e.add_argument("--seed", type=int, help="first seed; image i uses seed SEED+i (default 0)")
    e.add_argument(
        "--truncation",
        type=float,
        metavar="PSI",
        help="truncation ψ (generators with a mapping network; default: none)",
    )
    e.add_argument(
        "--feature-extractor",
        metavar="NAME",
        help="inception-v3-compat (default; needs its weights file) "
        "or dataset-cnn (a classifier from `ganforge extractor train`, for small data sets)",
    )
    e.add_argument(
        "--weights",
        metavar="PATH",
        help="the feature extractor's weights file (default for Inception: "
        "$GANFORGE_INCEPTION_WEIGHTS, else the file `ganforge weights get inception` wrote)",
    )
    e.add_argument("--cache-dir", metavar="DIR", help="held-out statistics cache (default ~/.cache/ganforge/eval)")
    e.add_argument("--holdout-num", type=int, metavar="N", help="use only the first N held-out images (default: all)")
    e.add_argument(
        "--kid-subset-size",
        type=int,
        metavar="N",
        help="KID subset size (default 1000, lowered to the smaller image count)",
    )
    e.add_argument("--batch-size", type=int, metavar="N", help="generator and feature-extractor batch (default 64)")
    e.add_argument("--device", default="cpu", help="torch device of the generator and feature extractor (default cpu)")
    e.add_argument("--verbose", action="store_true", help="show torch-fidelity's progress")
    e.add_argument("--json", action="store_true", help="print one JSON object (metrics, cache_hit, cache_key, …)")
    e.set_defaults(fn=_eval)


def _add_extractor(sub) -> None:
    """The ``extractor`` subcommand."""
    x = sub.add_parser(
        "extractor", help="feature extractors for evaluation", description="Feature extractors for evaluation."
    )
    xsub = x.add_subparsers(dest="extractor_command", required=True)
    xt = xsub.add_parser(
        "train",
        help="train the dataset-cnn feature extractor on labelled training shards",
        description="Train a small CNN classifier on a data set's training shards and save its "
        "weights, for `ganforge eval --feature-extractor dataset-cnn --weights OUT`: "
        "FID, KID and precision/recall in its penultimate layer, IS from its logits "
        "(the usual practice on MNIST-scale data, where Inception features mean little).",
    )
    xt.add_argument("--data", required=True, metavar="PATTERN", help="labelled training shards, e.g. 'DIR/train-*.tar'")
    xt.add_argument("--out", required=True, metavar="PATH", help="weights file to write, e.g. DIR/dataset-cnn.pt")
    xt.add_argument(
        "--holdout",
        metavar="PATTERN",
        help="shards to report accuracy on (default: holdout-*.tar beside --data, if any)",
    )
    xt.add_argument("--epochs", type=int, default=8, help="passes over the training shards (default 8)")
    xt.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    xt.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate, cosine-annealed (default 0.002)")
    xt.add_argument("--feature-dim", type=int, default=64, help="size of the feature layer (default 64)")
    xt.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order (default 0)")
    xt.add_argument("--device", default="cpu", help="torch device (default cpu)")
    xt.add_argument("--json", action="store_true", help="print one JSON object (path, accuracies, counts)")
    xt.set_defaults(fn=_extractor_train)


def _add_weights(sub) -> None:
    """The ``weights`` subcommand."""
    w = sub.add_parser(
        "weights",
        help="download feature extractor weights (the one command that downloads)",
        description="Download feature extractor weights into ganforge's cache. Training and evaluation "
        "never download; run this once on a machine with internet access.",
    )
    wsub = w.add_subparsers(dest="weights_command", required=True)
    wg = wsub.add_parser(
        "get",
        help="download weights into ganforge's cache (~/.cache/ganforge/weights)",
        description="Download torch-fidelity's Inception weights (weights-inception-2015-12-05-"
        "6726825d.pth) from their official URL into $GANFORGE_CACHE/weights (default "
        "~/.cache/ganforge/weights), where eval.weights_path looks when it is not set. "
        "Shows progress, resumes a download that was cut short (run it again), and keeps "
        "the file only if its sha256 is the expected one. Without a connection it "
        "prints the URL and where the file goes, and exits with status 2.",
    )
    wg.add_argument(
        "name",
        choices=("inception",),
        help="which weights: inception (torch-fidelity's InceptionV3 for FID, KID, IS and precision/recall)",
    )
    wg.add_argument("--no-progress", action="store_true", help="no progress bar")
    wg.add_argument("--url", help=argparse.SUPPRESS)  # tests: a file on a local server
    wg.add_argument("--sha256", help=argparse.SUPPRESS)
    wg.set_defaults(fn=_weights_get)


def _import_stylegan2_ada(a: argparse.Namespace) -> int:
    from orchestrator.tools.imports import import_stylegan2_ada

    path = import_stylegan2_ada(a.pickle, a.out, shards=a.shards)
    print(f"imported {a.pickle} (G, D, G_ema) into {path}")
    print(f"  sample it:  ganforge generate {path} --seeds 0-7 --out {Path(a.out) / 'samples'}")
    return 0


def _import_biggan_pytorch(a: argparse.Namespace) -> int:
    from orchestrator.tools.imports import import_biggan_pytorch

    path = import_biggan_pytorch(a.G, a.D, a.G_ema, a.out, shards=a.shards, bn_eps=a.bn_eps, sn_eps=a.sn_eps)
    print(f"imported {a.G}, {a.D}, {a.G_ema} into {path}")
    print(f"  sample it:  ganforge generate {path} --seeds 0-7 --out {Path(a.out) / 'samples'}")
    return 0


def _add_import(sub) -> None:
    """The ``import`` subcommand: official pretrained networks → a ganforge checkpoint."""
    i = sub.add_parser(
        "import",
        help="turn official pretrained networks into a ganforge checkpoint",
        description="Convert the networks of another code base into a ganforge checkpoint (step 0) that "
        "generate, eval and train --init-from take. Files are read as data only: no code from them runs. "
        "Every tensor must find its place and every place must be filled, or nothing is written.",
    )
    isub = i.add_subparsers(dest="import_command", required=True)
    shards = dict(
        default=None,
        metavar="PATTERN",
        help="data.shards of the checkpoint's config (default: a placeholder to replace before training)",
    )
    s = isub.add_parser(
        "stylegan2-ada",
        help="a StyleGAN2 network pickle of NVlabs' stylegan2-ada-pytorch or stylegan3",
        description="Import G, D and G_ema of a network pickle (network-snapshot-*.pkl or a released .pkl) "
        "of NVlabs' stylegan2-ada-pytorch or stylegan3 (StyleGAN2 networks). The pickle is read by a "
        "restricted unpickler that rebuilds tensors and containers only and never executes the module "
        "source the pickle carries. Seeds then give the official generate.py's images.",
    )
    s.add_argument("pickle", help="the network pickle (.pkl)")
    s.add_argument("out", help="output run directory; the checkpoint goes to OUT/checkpoints/ckpt-000000000")
    s.add_argument("--shards", **shards)
    s.set_defaults(fn=_import_stylegan2_ada)
    b = isub.add_parser(
        "biggan-pytorch",
        help="state dicts of ajbrock/BigGAN-PyTorch (G.pth D.pth G_ema.pth)",
        description="Import the G, D and G_ema state dicts saved by the authors' BigGAN-PyTorch (read with "
        "torch.load(weights_only=True)). Resolution, widths, classes, latent chunks, shared embedding and "
        "attention are read from the tensor shapes; the epsilons cannot be and are options.",
    )
    b.add_argument("G", help="G.pth")
    b.add_argument("D", help="D.pth")
    b.add_argument("G_ema", help="G_ema.pth")
    b.add_argument("out", help="output run directory; the checkpoint goes to OUT/checkpoints/ckpt-000000000")
    b.add_argument("--shards", **shards)
    b.add_argument("--bn-eps", type=float, default=1e-5, help="BatchNorm epsilon of the run (default 1e-5)")
    b.add_argument("--sn-eps", type=float, default=1e-6, help="spectral norm epsilon of the run (default 1e-6)")
    b.set_defaults(fn=_import_biggan_pytorch)


def build_parser() -> argparse.ArgumentParser:
    """The ``ganforge`` argument parser, one subcommand per ``_add_*`` function."""
    p = argparse.ArgumentParser(
        prog="ganforge", description="Train GANs from WebDataset shards, on one machine or a Ray cluster."
    )
    sub = p.add_subparsers(dest="command", required=True)
    overrides = dict(
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set train.batch_size=32; repeatable",
    )
    _add_train(sub, overrides)
    _add_generate(sub)
    _add_report(sub)
    _add_data(sub)
    _add_submit(sub, overrides)
    _add_info(sub, overrides)
    _add_eval(sub)
    _add_extractor(sub)
    _add_weights(sub)
    _add_import(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.config import ConfigError
    from orchestrator.checkpoint import CheckpointError
    from orchestrator.data.errors import DataError
    from orchestrator.eval.evaluator import EvalError
    from orchestrator.eval.weights import WeightsError
    from orchestrator.faults import NonfiniteError

    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError, EvalError, NonfiniteError, WeightsError) as e:
        print(f"ganforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG):
            raise
        where = e.filename or (f"into {args.run_dir}" if getattr(args, "run_dir", None) else "a file")
        print(
            f"ganforge {args.command}: error: cannot write {where}: {e.strerror}. Free space (or "
            f"fix the permissions) and run again; a training run continues from its last checkpoint with "
            f"--resume auto (checkpoints are written atomically, so the last complete one is intact)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
