"""The ``ganforge`` command: train, generate, data shards, info. Thin: parse, then call the orchestrator."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(a: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.train import train

    cfg = load_config(a.config, a.set)
    run_dir = Path(a.run_dir or Path("runs") / Path(a.config).stem)
    result = train(cfg, run_dir, resume=a.resume)
    print(f"\nfinished at step {result.step} ({result.nimg / 1000:.1f} kimg)")
    print(f"  checkpoint:  {result.checkpoint}")
    print(f"  sample grid: {result.grid}")
    print(f"  config:      {result.config}")
    print(f"  W&B run:     {result.wandb_dir or 'disabled'}")
    return 0


def _generate(a: argparse.Namespace) -> int:
    from orchestrator.generate import generate

    paths = generate(a.checkpoint, a.out, a.num, seed=a.seed, truncation=a.truncation, class_index=a.class_index,
                     device=a.device)
    print(f"wrote {len(paths) - 1} images and {paths[-1]}")
    return 0


def _shards(a: argparse.Namespace) -> int:
    from orchestrator.data import write_shards

    m = write_shards(a.source, a.out, a.resolution, holdout=a.holdout, shard_size=a.shard_size,
                     channels=a.channels, seed=a.seed)
    s = m["splits"]
    print(f"wrote {s['train']['count']} training images in {len(s['train']['shards'])} shard(s) and "
          f"{s['holdout']['count']} held-out images in {len(s['holdout']['shards'])} shard(s) to {a.out} "
          f"({m['resolution']}×{m['resolution']}, {m['channels']} channel(s), {m['num_classes']} classes)")
    return 0


def _info(a: argparse.Namespace) -> int:
    import torch

    import architectures
    from architectures.registry import count_params
    from orchestrator.config import load_config
    from orchestrator.data import image_spec, load_manifest

    cfg = load_config(a.config, a.set)
    spec = image_spec(cfg.data, load_manifest(cfg.data))
    arch = architectures.get(cfg.model.arch)
    with torch.device("meta"):  # shapes and counts without allocating or computing anything
        G, D = arch.build_generator(cfg.model, spec), arch.build_discriminator(cfg.model, spec)
        z = torch.zeros(1, G.z_dim)
        c = torch.zeros(1, dtype=torch.long) if spec.num_classes else None
        out_shape = list(G(z, c).shape)
        d_shape = list(D(torch.zeros(out_shape), c).shape)
    info = {"config": cfg.model_dump(mode="json"), "arch": cfg.model.arch, "g_params": count_params(G),
            "d_params": count_params(D), "output_shape": out_shape, "d_output_shape": d_shape,
            "image": {"resolution": spec.resolution, "channels": spec.channels, "num_classes": spec.num_classes}}
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        print(cfg.to_yaml())
        print(f"# {cfg.model.arch}: G {info['g_params']:,} trainable parameters, D {info['d_params']:,}; "
              f"G output {out_shape}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ganforge", description="Train GANs from WebDataset shards, on one machine or a Ray cluster.")
    sub = p.add_subparsers(dest="command", required=True)
    overrides = dict(action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config value (YAML syntax), e.g. --set train.batch_size=32; repeatable")

    t = sub.add_parser("train", help="train a GAN from a YAML config", description="Train (or resume) a GAN from a YAML config.")
    t.add_argument("config", help="YAML config, e.g. configs/dev/dcgan-digits.yaml")
    t.add_argument("--set", **overrides)
    t.add_argument("--run-dir", help="where checkpoints, samples, logs and the W&B run go (default: runs/<config name>)")
    t.add_argument("--resume", metavar="auto|PATH", help="'auto': continue from the newest complete checkpoint in "
                   "the run directory (fresh if none); PATH: from that checkpoint directory")
    t.set_defaults(fn=_train)

    g = sub.add_parser("generate", help="sample images from a checkpoint's G_ema",
                       description="Write one PNG per seed and a grid, from a checkpoint's G_ema.")
    g.add_argument("checkpoint", help="a checkpoint directory (runs/NAME/checkpoints/ckpt-NNNNNNNNN)")
    g.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed SEED+i (default 0)")
    g.add_argument("--truncation", type=float, metavar="PSI", help="truncation ψ (architectures with a mapping network)")
    g.add_argument("--class", dest="class_index", type=int, metavar="INDEX", help="class to sample (conditional models; default: random)")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.set_defaults(fn=_generate)

    d = sub.add_parser("data", help="prepare data", description="Prepare data for training.")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("shards", help="write WebDataset shards from images",
                        description="Write train-NNNNNN.tar and holdout-NNNNNN.tar shards and manifest.json from an image "
                                    "folder (class labels from subfolders), a .zip of one, an .npz (images, labels) or "
                                    "builtin:digits (scikit-learn's handwritten digits).")
    s.add_argument("source", help="folder, .zip, .npz or builtin:digits")
    s.add_argument("out", help="output directory")
    s.add_argument("--resolution", type=int, required=True, help="square output size in pixels (a power of two)")
    s.add_argument("--holdout", type=float, default=0.1, help="fraction held out for evaluation (default 0.1)")
    s.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    s.add_argument("--channels", type=int, choices=(1, 3), help="1 (grey) or 3 (RGB); default: grey only if every image is")
    s.add_argument("--seed", type=int, default=0, help="seed of the train/held-out split (default 0)")
    s.set_defaults(fn=_shards)

    i = sub.add_parser("info", help="show a config's resolved values and network sizes",
                       description="Print the resolved config, G and D trainable parameter counts and output shape.")
    i.add_argument("config", help="YAML config")
    i.add_argument("--set", **overrides)
    i.add_argument("--json", action="store_true", help="one JSON object (keys include g_params, d_params) for scripts")
    i.set_defaults(fn=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator.checkpoint import CheckpointError
    from orchestrator.config import ConfigError
    from orchestrator.data import DataError

    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"ganforge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
