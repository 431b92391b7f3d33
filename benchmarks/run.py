"""Benchmarks, run by hand or `make bench`; figures go to docs/benchmarks.md with date and command.

    python -m benchmarks.run [NAME ...]      # default: all

Each benchmark prints one table. Ratios are measured within one run (these machines are noisy).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dev_loader_settings(steps: int = 150) -> None:
    """Training images/s of the DCGAN digits preset for DataLoader workers × torch threads."""
    from orchestrator.config import load_config
    from orchestrator.data.write import write_shards
    from orchestrator.train.run import train

    os.environ["WANDB_MODE"] = "disabled"
    with tempfile.TemporaryDirectory() as tmp:
        write_shards("builtin:digits", Path(tmp) / "d", resolution=32, shard_size=256)
        rows = []
        for workers, threads in ((0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)):
            cfg = load_config(
                ROOT / "configs/dev/dcgan-digits.yaml",
                [
                    f"data.shards={tmp}/d/train-*.tar",
                    f"data.workers={workers}",
                    f"train.threads={threads}",
                    f"train.stop_at_step={steps}",
                    "tracking.progress_bar=false",
                    "tracking.wandb.mode=disabled",
                    "eval.enabled=false",
                    f"tracking.log_every={steps // 3}",
                    "checkpoint.every_kimg=1000",
                    "tracking.sample_every_kimg=1000",
                ],
            )
            run_dir = Path(tmp) / f"w{workers}t{threads}"
            train(cfg, run_dir)
            rows.append((workers, threads, json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])))
        print("\n| loader workers | torch threads | img/s (steady, last third) | data wait |")
        print("|---|---|---|---|")
        for w, t, r in rows:
            print(f"| {w} | {t} | {r['perf/img_per_s']:.0f} | {r['perf/data_wait']:.1%} |")


FORWARD_1024 = """
import resource, sys, time, torch
from orchestrator.config import load_config
from architectures import ImageSpec, get
torch.set_num_threads(int(sys.argv[1]))
cfg = load_config("configs/stylegan2/config-f-1024.yaml")
arch = get("stylegan2")
G = arch.build_generator(cfg.model, ImageSpec(1024, 3, 0)).eval()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
z = torch.randn(1, G.z_dim)
times = []
with torch.no_grad():
    for _ in range(3):
        t = time.perf_counter()
        img = G(z, None, noise_mode="const")
        times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{tuple(img.shape)} {min(times):.2f} {sorted(times)[1]:.2f} {base:.0f} {peak:.0f}")
"""


def stylegan2_1024_forward() -> None:
    """Time and peak memory of one config-F 1024×1024 G forward (batch 1, fp32, no grad) on CPU."""
    import subprocess

    print("\n| torch threads | output | best of 3 (s) | median (s) | RSS after building G (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for threads in (1, 2):
        out = subprocess.run(
            [sys.executable, "-c", FORWARD_1024, str(threads)], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        print(f"| {threads} | {out[0]}{out[1]}{out[2]}{out[3]} | {out[4]} | {out[5]} | {out[6]} | {out[7]} |")


def _torchrun(nproc: int, config: str, run_dir: Path, overrides: list[str]) -> dict:
    """Run launch.worker under torchrun; return rank 0's last metrics row."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        f"--nproc_per_node={nproc}",
        f"--master_port={port}",
        "-m",
        "launch.worker",
        config,
        "--run-dir",
        str(run_dir),
    ]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


MATMUL = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a, b = torch.randn(512, 512), torch.randn(512, 512)
for _ in range(5):
    a @ b
t, n = time.perf_counter(), 0
while time.perf_counter() - t < 4:
    a @ b
    n += 1
print(2 * 512**3 * n / (time.perf_counter() - t) / 1e9)
"""


def parallel_capacity() -> float:
    """What two cores give right now: fp32 matmul GFLOP/s of one 1-thread process alone, of two at once, and of
    one 2-thread process. Returns the ceiling of a 2-worker scaling efficiency, (two at once) / (2 × alone):
    below 1 when the machine's second core is busy or shared (another job, a host that oversubscribes)."""
    import subprocess

    def run(threads: int, copies: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", MATMUL, str(threads)], stdout=subprocess.PIPE, text=True)
                 for _ in range(copies)]  # fmt: skip
        return [float(p.communicate()[0]) for p in procs]

    alone, pair, threads2 = run(1, 1)[0], run(1, 2), run(2, 1)[0]
    ceiling = sum(pair) / (2 * alone)
    print(f"matmul GFLOP/s: 1 process {alone:.0f}; 2 processes at once {pair[0]:.0f} + {pair[1]:.0f}; "
          f"1 process × 2 threads {threads2:.0f}; scaling ceiling {ceiling:.2f}", flush=True)  # fmt: skip
    return ceiling


# name: (config, shard channels, steps, overrides); global batch fixed per preset, 1 thread per worker
SCALING_PRESETS = {
    "dcgan-digits": ("configs/dev/dcgan-digits.yaml", 1, 160, ["data.resolution=32"]),
    "stylegan2-dev": ("configs/stylegan2/dev.yaml", 1, 160, ["data.resolution=16"]),
    # compute-bound: the cifar preset's layout at 32×32 RGB with 4× fewer channels (about 1.3 M + 1.4 M
    # parameters), batch 32, so that a step is ~0.5 s of arithmetic per worker rather than overhead
    "stylegan2-mid": (
        "configs/stylegan2/cifar.yaml", 3, 40,
        ["data.resolution=32", "data.channels=3", "data.num_classes=10", "train.precision=fp32",
         "train.device=cpu", "train.batch_size=32", "model.num_fp16_res=0", "model.conv_clamp=null",
         "model.mbstd_group_size=4", "model.channel_base=8192", "model.channel_max=128"],
    ),
}  # fmt: skip


def ddp_scaling(
    presets: tuple[str, ...] = tuple(SCALING_PRESETS), profile: bool = False, compile: bool = False
) -> None:
    """Training images/s of each preset with 1 and 2 torchrun workers (1 thread each, DDP over gloo, the
    same global batch), and the scaling efficiency (img/s with 2) / (2 × img/s with 1). With ``profile``,
    rank 0's labelled regions of 10 profiled steps are printed as well; with ``compile``, both runs compile
    their networks (``train.compile=true``; the first half of each run, compile included, is not measured)."""
    from orchestrator.data.write import write_shards

    rows, ceiling = [], parallel_capacity()
    with tempfile.TemporaryDirectory() as tmp:
        for name in presets:
            config, channels, steps, extra = SCALING_PRESETS[name]
            res = int(next(o for o in extra if o.startswith("data.resolution=")).split("=")[1])
            shards = Path(tmp) / f"{name}-shards"
            write_shards("builtin:digits", shards, resolution=res, shard_size=128, channels=channels)
            common = [
                f"data.shards={shards}/train-*.tar",
                "data.workers=0",
                "train.threads=1",
                f"train.stop_at_step={steps}",
                "eval.enabled=false",
                "tracking.progress_bar=false",
                f"tracking.log_every={steps // 2}",
                "checkpoint.every_kimg=100000",
                "tracking.sample_every_kimg=100000",
                *extra,
                f"train.compile={str(compile).lower()}",
                *(["tracking.profile_steps=10", f"tracking.profile_after={steps // 2}"] if profile else []),
            ]
            one = _torchrun(1, config, Path(tmp) / f"{name}-1", common)
            two = _torchrun(2, config, Path(tmp) / f"{name}-2", common + ["distributed.strategy=ddp"])
            rows.append((name, one["perf/img_per_s"], two["perf/img_per_s"]))
            if profile:
                for n in (1, 2):
                    text = (Path(tmp) / f"{name}-{n}" / "profile" / "rank0.txt").read_text()
                    print(f"\n{name}, {n} worker(s), rank 0:\n" + text[: text.index("operators:") + 2500])
    print("\n| preset | 1 worker img/s | 2 DDP workers img/s | scaling efficiency |\n|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.0f} | {b:.0f} | {b / (2 * a):.2f} |")
    print("\n(img/s over the second half of each run; efficiency = 2-worker img/s / twice the 1-worker img/s)")
    parallel_capacity()
    print(f"(the machine's own ceiling, measured before and after: {ceiling:.2f} before)")


def strategy_memory() -> None:
    """Peak resident memory of rank 0 for one step of the StyleGAN2 `cifar` networks (20.2 M + 23.1 M
    parameters) on 2 workers: DDP versus DeepSpeed ZeRO-2 (fp32, global batch 16: micro-batches of 4, 2 accumulated)."""
    from orchestrator.data.write import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        write_shards("builtin:digits", Path(tmp) / "d", resolution=32, shard_size=128, channels=3)
        common = [
            f"data.shards={tmp}/d/train-*.tar",
            "data.workers=0",
            "data.resolution=32",
            "data.channels=3",
            "data.num_classes=10",
            "train.precision=fp32",
            "train.device=cpu",
            "train.batch_size=16",
            "train.micro_batch=4",
            "train.stop_at_step=1",
            "model.num_fp16_res=0",
            "model.conv_clamp=null",
            "model.mbstd_group_size=4",
            "tracking.progress_bar=false",
            "tracking.log_every=1",
            "checkpoint.every_kimg=1000",
            "tracking.sample_every_kimg=1000",
            "tracking.wandb.mode=disabled",
        ]
        rows = []
        for strategy in ("ddp", "deepspeed"):
            extra = [f"distributed.strategy={strategy}", "distributed.deepspeed_config=configs/deepspeed/zero2.yaml"]
            r = _torchrun(2, "configs/stylegan2/cifar.yaml", Path(tmp) / strategy, common + extra)
            rows.append((strategy, r["perf/peak_mem_mb"]))
    print("\n| strategy | rank 0 peak RSS (MiB) |\n|---|---|")
    for name, mem in rows:
        print(f"| {name} | {mem:.0f} |")
    print(f"\nZeRO-2 / DDP: {rows[1][1] / rows[0][1]:.2f}")


def evaluator_overhead(steps: int = 600) -> None:
    """Training images/s of the DCGAN digits preset on 2 Ray workers (0.75 CPU each) with the evaluator actor
    evaluating every 0.64 kimg on its own 0.5 CPU (at the default ``eval.nice`` and ``eval.sched_idle``), versus
    without it, and how far behind training the evaluations arrived (``eval/lag_kimg``, ``eval/lag_s``); the
    Ray job with ``ray.checkpoint_upload`` sync and async (a checkpoint every 10 steps, as each evaluation
    needs one); and the same config in dev mode (one process, ``ganforge train``) as the Ray job's reference.
    Starts and stops a loopback Ray head."""
    import subprocess

    from orchestrator.data.write import write_shards
    from orchestrator.eval.extractors import train_feature_extractor

    with tempfile.TemporaryDirectory() as tmp:
        home, temp = Path(tmp) / "home", Path(tempfile.mkdtemp(prefix="gf-bench-ray-"))
        home.mkdir()
        env = {
            **os.environ,
            "HOME": str(home),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "WANDB_MODE": "disabled",
        }
        write_shards("builtin:digits", Path(tmp) / "d", resolution=32, shard_size=256)
        train_feature_extractor(f"{tmp}/d/train-*.tar", Path(tmp) / "cnn.pt", epochs=3)
        subprocess.run(
            [
                "ray",
                "start",
                "--head",
                "--num-cpus=2",
                "--disable-usage-stats",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                f"--temp-dir={temp}",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        rates = {}
        dev = [f"data.shards={tmp}/d/train-*.tar", "eval.enabled=false", f"train.stop_at_step={steps}",
               "tracking.progress_bar=false", "tracking.log_every=10", "checkpoint.every_kimg=0.64"]  # fmt: skip
        cmd = ["ganforge", "train", "configs/dev/dcgan-digits.yaml", "--run-dir", f"{tmp}/dev"]
        subprocess.run(cmd + [x for o in dev for x in ("--set", o)], cwd=ROOT, env=env, check=True, capture_output=True)
        rows = [json.loads(x) for x in (Path(tmp) / "dev/metrics.jsonl").read_text().splitlines() if "loss/D" in x]
        rest = rows[len(rows) // 3 :]
        rates["dev"] = sum(r["perf/img_per_s"] for r in rest) / len(rest)
        try:
            for upload, evaluating in (("sync", False), ("async", False), ("async", True)):
                run_dir = Path(tmp) / f"{upload}-eval-{evaluating}"
                cmd = [
                    "ganforge",
                    "submit",
                    "configs/dev/dcgan-digits.yaml",
                    "--address",
                    "http://127.0.0.1:8265",
                    "--run-dir",
                    str(run_dir),
                ]
                for o in [
                    f"data.shards={tmp}/d/train-*.tar",
                    f"eval.weights_path={tmp}/cnn.pt",
                    f"eval.enabled={evaluating}",
                    "eval.every_kimg=0.64",
                    "eval.num_samples=2000",
                    f"eval.cache_dir={tmp}/cache",
                    f"train.stop_at_step={steps}",
                    "train.threads=1",
                    "tracking.progress_bar=false",
                    "tracking.log_every=10",
                    "checkpoint.every_kimg=0.64",
                    "ray.max_failures=0",
                    f"ray.checkpoint_upload={upload}",
                ]:
                    cmd += ["--set", o]
                subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
                rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss/D" in x]
                rest = rows[len(rows) // 3 :]  # past start-up
                rates[upload, evaluating] = sum(r["perf/img_per_s"] for r in rest) / len(rest)
                if evaluating:
                    evals = len((run_dir / "eval.jsonl").read_text().splitlines())
                    lags = [
                        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/lag_s" in x
                    ]
        finally:
            subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)
            shutil.rmtree(temp, ignore_errors=True)
    print("\n| run | training img/s (mean of log intervals after the first third) |\n|---|---|")
    print(f"| dev mode (one process) | {rates['dev']:.0f} |")
    print(f"| Ray job, 2 workers, checkpoint upload sync, evaluator off | {rates['sync', False]:.0f} |")
    print(f"| Ray job, 2 workers, checkpoint upload async, evaluator off | {rates['async', False]:.0f} |")
    print(
        f"| Ray job, 2 workers, async, evaluator on ({evals} evaluations of 2,000 samples) | {rates['async', True]:.0f} |"
    )
    sync, off, on = rates["sync", False], rates["async", False], rates["async", True]
    print(f"\nRay job / dev mode: sync {sync / rates['dev']:.2f}, async {off / rates['dev']:.2f}; "
          f"evaluator on / off: {on / off:.2f}")  # fmt: skip
    print("\n| evaluation lag | mean | max |\n|---|---|---|")
    for key, unit in (("eval/lag_kimg", "kimg"), ("eval/lag_s", "s")):
        values = [r[key] for r in lags]
        print(f"| {unit} | {sum(values) / len(values):.2f} | {max(values):.2f} |")


def nonfinite_guard_overhead(steps: int = 300, repeats: int = 2) -> None:
    """Training images/s of the DCGAN digits preset with the NaN/Inf guard (``faults.skip_nonfinite``: one
    finiteness check and host sync per optimizer step) on and off, alternated, best of ``repeats`` each."""
    from orchestrator.config import load_config
    from orchestrator.data.write import write_shards
    from orchestrator.train.run import train

    os.environ["WANDB_MODE"] = "disabled"
    rates: dict[bool, float] = {True: 0.0, False: 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        write_shards("builtin:digits", Path(tmp) / "d", resolution=32, shard_size=256)
        for i in range(repeats):
            for guard in (False, True):
                cfg = load_config(
                    ROOT / "configs/dev/dcgan-digits.yaml",
                    [
                        f"data.shards={tmp}/d/train-*.tar",
                        f"faults.skip_nonfinite={str(guard).lower()}",
                        f"train.stop_at_step={steps}",
                        "tracking.progress_bar=false",
                        "tracking.wandb.mode=disabled",
                        "eval.enabled=false",
                        f"tracking.log_every={steps // 3}",
                        "checkpoint.every_kimg=1000",
                        "tracking.sample_every_kimg=1000",
                    ],
                )
                run_dir = Path(tmp) / f"g{guard}-{i}"
                train(cfg, run_dir)
                row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
                rates[guard] = max(rates[guard], row["perf/img_per_s"])
    print("\n| NaN/Inf guard | img/s (steady, best of %d) |\n|---|---|" % repeats)
    print(f"| off | {rates[False]:.0f} |\n| on | {rates[True]:.0f} |")
    print(f"\non / off: {rates[True] / rates[False]:.3f}")


CIFAR_STEP = """
import json, sys, tempfile, time
from orchestrator.config import load_config
from orchestrator.train.run import Run, compiled_graphs
shards, threads, compiled, batch, main_steps = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
cfg = load_config("configs/stylegan2/cifar.yaml", [
    f"data.shards={shards}", "data.workers=0", "train.precision=fp32", "train.device=cpu", f"train.batch_size={batch}",
    f"train.threads={threads}", f"train.compile={str(compiled).lower()}", "model.num_fp16_res=0", "model.conv_clamp=null",
    f"model.mbstd_group_size={min(batch, 32)}", "eval.enabled=false", "tracking.progress_bar=false",
    "tracking.wandb.mode=disabled", "checkpoint.every_kimg=100000", "tracking.sample_every_kimg=100000", *sys.argv[6:]])
run = Run.build(cfg, tempfile.mkdtemp())
def timed():
    t = time.perf_counter()
    run.step()
    return time.perf_counter() - t
first = timed()  # D, Dreg (its counter is at 0) and G: compiles everything
timed()
main = sorted(timed() for _ in range(main_steps))
run.progress.phases["Dreg"] = cfg.loss.r1_interval * 1000  # the next step runs lazy R1 as well
with_reg = timed()
t_main = main[len(main) // 2]
full = t_main + max(with_reg - t_main, 0) / cfg.loss.r1_interval
print(json.dumps({"first_s": first, "main_s": main, "with_reg_s": with_reg, "full_s": full, "graphs": compiled_graphs()}))
"""


def stylegan2_cifar_compile(batch: int = 16, main_steps: int = 3) -> None:
    """The StyleGAN2 ``cifar`` preset's networks (20.2 M + 23.1 M parameters, 32×32 RGB, fp32 on CPU, batch
    ``batch``): the full training step (D main, G main and lazy R1 every 16 steps) eager and compiled, at 1 and
    2 threads, each in its own process. Full step = median main step + (a step with R1 - that) / 16."""
    import subprocess

    from orchestrator.data.write import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        write_shards("builtin:digits", Path(tmp) / "d", resolution=32, shard_size=256, channels=3)
        rows = {}
        for threads in (1, 2):
            for compiled in (False, True):
                args = [f"{tmp}/d/train-*.tar", str(threads), str(int(compiled)), str(batch), str(main_steps)]
                out = subprocess.run([sys.executable, "-c", CIFAR_STEP, *args], cwd=ROOT, capture_output=True,
                                     text=True, check=True).stdout  # fmt: skip
                rows[threads, compiled] = r = json.loads(out.strip().splitlines()[-1])
                print(f"threads {threads} compiled {compiled}: {json.dumps(r)}", flush=True)
    print(
        "\n| threads | eager full step (s) | compiled full step (s) | compiled / eager speed | first compiled step (s) |"
    )
    print("|---|---|---|---|---|")
    for threads in (1, 2):
        e, c = rows[threads, False], rows[threads, True]
        print(
            f"| {threads} | {e['full_s']:.2f} | {c['full_s']:.2f} | {e['full_s'] / c['full_s']:.2f} | {c['first_s']:.0f} |"
        )


def compile_demo(steps: int = 400) -> None:
    """The demo's DCGAN eager, then with ``train.compile``, in one process: median img/s after warm-up."""
    from orchestrator.config import load_config
    from orchestrator.train.run import train

    fixed = ["eval.enabled=false", "tracking.progress_bar=false", "tracking.log_every=50", "tracking.wandb.mode=disabled",
             f"train.stop_at_step={steps}", "checkpoint.every_kimg=1000", "tracking.sample_every_kimg=1000"]  # fmt: skip
    speed = {}
    for compiled in (False, True):
        run_dir = Path(tempfile.mkdtemp()) / "run"
        cfg = load_config(ROOT / "configs/dev/dcgan-digits.yaml", fixed + [f"train.compile={str(compiled).lower()}"])
        t0 = time.time()
        train(cfg, run_dir)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steady = sorted(r["perf/img_per_s"] for r in rows if "perf/img_per_s" in r)[2:]
        speed[compiled] = steady[len(steady) // 2]
        print(f"compile={compiled}: wall {time.time() - t0:.1f} s, median {speed[compiled]:.0f} img/s", flush=True)
        shutil.rmtree(run_dir.parent, ignore_errors=True)
    print(f"compiled / eager: {speed[True] / speed[False]:.2f}")


QUIET = [
    "eval.enabled=false",
    "tracking.progress_bar=false",
    "tracking.wandb.mode=disabled",
    "checkpoint.every_kimg=1000",
    "tracking.sample_every_kimg=1000",
]


def _stream_presets(shards: Path, digits_steps: int, cifar_steps: int) -> list[tuple[str, str, list[str], int]]:
    """``(name, config, overrides, training steps)`` of the two presets data_stream measures: the demo's DCGAN
    on 32×32 grey digits and StyleGAN2 cifar (fp32 on CPU) on the digits as 32×32 RGB; both batch 64."""
    cifar = [
        f"data.shards={shards}/rgb/train-*.tar",
        "data.resolution=32",
        "data.channels=3",
        "data.num_classes=10",
        "train.precision=fp32",
        "train.device=cpu",
        "model.num_fp16_res=0",
        "model.conv_clamp=null",
    ]
    return [
        ("dcgan-digits", "configs/dev/dcgan-digits.yaml", [f"data.shards={shards}/grey/train-*.tar"], digits_steps),
        ("stylegan2-cifar", "configs/stylegan2/cifar.yaml", cifar, cifar_steps),
    ]


def _stream_img_per_s(cfg, batches: int) -> float:
    """Images/s of the ShardLoader alone, handing out ``batches`` micro-batches as the Run asks for them
    (after a warm-up of two batches per reading role, which starts the workers)."""
    from orchestrator.data.shards import ShardLoader, image_spec, load_manifest
    from orchestrator.train.preflight import batch_split

    micro, _ = batch_split(cfg.train.batch_size, cfg.train.micro_batch, 1)
    loader = ShardLoader(cfg.data, image_spec(cfg.data, load_manifest(cfg.data)), micro, seed=cfg.train.seed)
    for _ in range(2 * max(1, cfg.data.workers)):
        loader.next()
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next()
    return batches * micro / (time.perf_counter() - t0)


def _training_rate(cfg, run_dir: Path) -> tuple[float, float]:
    """``(img/s, fraction of wall time waiting for data)`` of a training run's last log interval."""
    from orchestrator.train.run import train

    train(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "perf/img_per_s" in r][-1]
    return last["perf/img_per_s"], last["perf/data_wait"]


def data_stream(batches: int = 200, digits_steps: int = 150, cifar_steps: int = 6, workers=(0, 1, 2)) -> None:
    """The ShardLoader's images/s alone next to what training consumes, for 0/1/2 loader workers, on the demo's
    DCGAN digits preset and StyleGAN2 cifar (fp32, CPU). Training figures are the last third of the run's
    steps (a StyleGAN2 cifar step took 80-160 s on 2 shared CPU cores: the whole benchmark takes most of an hour).
    The speed issue's bar: stream ≥ 3× training and data wait < 2% of wall time."""
    from orchestrator.config import load_config
    from orchestrator.data.write import write_shards

    os.environ["WANDB_MODE"] = "disabled"
    default_threads = _torch_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_shards("builtin:digits", Path(tmp) / "grey", resolution=32, shard_size=256)
        write_shards("builtin:digits", Path(tmp) / "rgb", resolution=32, shard_size=128, channels=3)
        for name, config, overrides, steps in _stream_presets(Path(tmp), digits_steps, cifar_steps):
            for w in workers:
                run = [f"data.workers={w}", f"train.stop_at_step={steps}", f"tracking.log_every={max(1, steps // 3)}"]
                cfg = load_config(ROOT / config, QUIET + overrides + run)
                _torch_threads(cfg.train.threads or default_threads)  # the decoding process's threads, as training's
                stream = _stream_img_per_s(cfg, batches)
                trained, wait = _training_rate(cfg, Path(tmp) / f"{name}-w{w}")
                rows.append((name, w, stream, trained, wait))
                print(
                    f"{name}, {w} loader workers: stream {_rate(stream)}, training {_rate(trained)} img/s", flush=True
                )
    print("\n| preset | loader workers | stream img/s | training img/s | stream / training | data wait | ≥3×, <2% |")
    print("|---|---|---|---|---|---|---|")
    for name, w, stream, trained, wait in rows:
        ok = "yes" if stream >= 3 * trained and wait < 0.02 else "no"
        print(f"| {name} | {w} | {_rate(stream)} | {_rate(trained)} | {stream / trained:.1f} | {wait:.1%} | {ok} |")


def _real_vs_real_fid(train_urls: list[str], holdout_urls: list[str], spec, weights: Path) -> float:
    """FID of real training images against the held-out ones with the dataset-cnn extractor: the floor."""
    import torch_fidelity

    from orchestrator.eval import extractors  # noqa: F401 - registers dataset-cnn with torch-fidelity
    from orchestrator.eval.evaluator import ShardImages

    raw = torch_fidelity.calculate_metrics(
        input1=ShardImages(train_urls, spec), input2=ShardImages(holdout_urls, spec), fid=True, cuda=False,
        feature_extractor="dataset-cnn", feature_extractor_weights_path=str(weights), verbose=False,
    )  # fmt: skip
    return float(raw["frechet_inception_distance"])


def ada_small_data(
    kimg: float = 100.0,
    max_train: int = 160,
    seeds: tuple[int, ...] = (0, 1),
    eval_every: float | None = None,
    runs: dict[str, list[str]] | None = None,
    config: str = "configs/dev/dcgan-digits.yaml",
) -> None:
    """The demo's DCGAN (or ``config``; 32×32 digits, unconditional) on a 10% subset (``max_train`` training images, the whole
    held-out split) without augmentation, with ADA (bgc, adaptive p) and with DiffAugment, at equal kimg; FID (dataset-cnn
    features, 2000 samples) against the held-out split, beside the real-vs-real floors; img/s of each. Each
    setting runs with every seed of ``seeds`` (FID on small data varies between seeds); ``eval_every`` kimg
    (default: at the end only) also prints the FID/KID trajectory; ``runs``: other settings (name: overrides)."""
    import numpy as np
    from sklearn.datasets import load_digits

    from core.spec import ImageSpec
    from orchestrator.config import load_config
    from orchestrator.data.shards import expand_shards
    from orchestrator.data.write import write_shards
    from orchestrator.train.run import train

    weights = ROOT / "data/digits32/dataset-cnn.pt"
    if not weights.exists():
        raise SystemExit(f"{weights} is missing: run `make data/digits32/dataset-cnn.pt` first")
    work = Path(tempfile.mkdtemp())
    small = work / "digits32-small"
    # unconditional: the digits without labels (a 6 turned by ADA's rotate90 is a 9, which blurs a class-conditional
    # D's labels); the same images, split and held-out set as builtin:digits
    np.savez(work / "digits.npz", images=np.round(load_digits().images * (255 / 16)).astype(np.uint8))
    write_shards(str(work / "digits.npz"), small, resolution=32, shard_size=40, max_train=max_train)
    holdout, spec = expand_shards(str(small / "holdout-*.tar")), ImageSpec(32, 1, 0)
    floor_small = _real_vs_real_fid(expand_shards(str(small / "train-*.tar")), holdout, spec, weights)
    floor_full = _real_vs_real_fid(expand_shards(str(ROOT / "data/digits32/train-*.tar")), holdout, spec, weights)
    print(f"real-vs-real FID vs held-out: {max_train} training images {floor_small:.2f}, all 1617 {floor_full:.2f}")
    runs = runs or {
        "none": ["augment.kind=none"],
        "ada": ["augment.kind=ada", "augment.preset=bgc", "augment.speed_kimg=100"],
        "diffaugment": ["augment.kind=diffaugment"],
    }
    for (name, extra), seed in itertools.product(runs.items(), seeds):
        run_dir = work / f"{name}-{seed}"
        overrides = [f"train.seed={seed}",
            f"data.shards={small / 'train-*.tar'}", f"data.holdout={small / 'holdout-*.tar'}",
            "data.shuffle_buffer=200", f"train.total_kimg={kimg}", f"eval.every_kimg={eval_every or kimg}",
            "tracking.progress_bar=false", "tracking.wandb.mode=disabled", "tracking.log_every=50",
            f"checkpoint.every_kimg={kimg}", f"tracking.sample_every_kimg={kimg}", *extra,
        ]  # fmt: skip
        t0 = time.time()
        result = train(load_config(ROOT / config, overrides), run_dir)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        speed = sorted(r["perf/img_per_s"] for r in rows if "perf/img_per_s" in r)
        fid = [e["eval/fid"] for e in result.evaluations if "eval/fid" in e]
        if eval_every:
            trajectory = [(e["kimg"], round(e["eval/fid"], 1), f"{e['eval/kid']:.3g}") for e in result.evaluations]
            print(f"{name} seed {seed}: (kimg, FID, KID) {trajectory}", flush=True)
        last = [r for r in rows if "loss/D" in r][-1]
        print(
            f"{name} seed {seed}: FID {fid[-1]:.2f} at {kimg} kimg (start {fid[0]:.2f}), median {speed[len(speed) // 2]:.0f} img/s, "
            f"p {last.get('aug/p', 0):.3f}, r_t {last.get('aug/rt', float('nan')):.3f}, "
            f"D/real {last['D/real']:.3f}, wall {time.time() - t0:.0f} s",
            flush=True,
        )
    shutil.rmtree(work, ignore_errors=True)


def ada_small_data_stylegan2(
    kimg: float = 300.0, seeds: tuple[int, ...] = (0, 1), settings: tuple[str, ...] = ("none", "ada")
) -> None:
    """:func:`ada_small_data` with the StyleGAN2 dev preset (32×32 here, no BatchNorm in D, lazy R1) instead of the
    DCGAN: no augmentation against ADA (bgc, adaptive, ``speed_kimg`` 100), 1 thread per run, FID/KID every 50
    kimg. ``settings`` picks some (run ``("none",)`` and ``("ada",)`` as two processes side by side on 2 cores:
    the same numbers, half the wall time)."""
    evaluation = ["eval.enabled=true", "eval.feature_extractor=dataset-cnn",
                  f"eval.weights_path={ROOT / 'data/digits32/dataset-cnn.pt'}", "eval.metrics=[fid,kid]",
                  "eval.num_samples=2000", "train.threads=1"]  # fmt: skip
    runs = {
        "none": [*evaluation, "augment.kind=none"],
        "ada": [*evaluation, "augment.kind=ada", "augment.preset=bgc", "augment.speed_kimg=100"],
    }
    ada_small_data(kimg, seeds=seeds, eval_every=50, config="configs/stylegan2/dev.yaml",
                   runs={name: runs[name] for name in settings})  # fmt: skip


def augment_cost(calls: int = 20) -> None:
    """Milliseconds per forward + backward of ADA's pipeline (bgc and bgcfnc at p = 1 and 0) and DiffAugment, on
    the demo's batch (64 × 1 × 32 × 32) and on 16 RGB CIFAR-size images; median of ``calls``."""
    import torch

    from orchestrator.augment.ada import make_augment_pipe
    from orchestrator.augment.diffaugment import diff_augment

    def median_ms(fn, x: torch.Tensor) -> float:
        times = []
        for _ in range(calls + 3):
            t0 = time.perf_counter()
            fn(x).square().sum().backward()
            times.append(time.perf_counter() - t0)
        return sorted(times[3:])[calls // 2] * 1000

    torch.manual_seed(0)
    for shape in ((64, 1, 32, 32), (16, 3, 32, 32)):
        x = torch.randn(shape, requires_grad=True)
        cases = {f"ada {k} p={p}": make_augment_pipe(k, p) for k in ("bgc", "bgcfnc") for p in (1.0, 0.0)}
        cases["diffaugment"] = diff_augment
        row = ", ".join(f"{name} {median_ms(fn, x):.1f} ms" for name, fn in cases.items())
        print(f"{list(shape)} ({_torch_threads()} threads): {row}", flush=True)


def _rate(img_per_s: float) -> str:
    """An images/s figure: whole numbers from 100 up, two decimals below (CPU StyleGAN2 trains at about 1)."""
    return f"{img_per_s:,.0f}" if img_per_s >= 100 else f"{img_per_s:.2f}"


def _torch_threads(n: int | None = None) -> int:
    """torch's intra-op threads of this process, after setting them to ``n`` when given."""
    import torch

    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


IMAGE_TO_IMAGE = {  # name: (preset, the make target that writes its data and classifiers)
    "pix2pix": ("configs/pix2pix/edges2digits.yaml", "data/edges2digits/manifest.json data/digits32/dataset-cnn.pt"),
    "cyclegan": (
        "configs/cyclegan/digits2digitsm.yaml",
        "data/digits2digitsm/manifest.json data/digits32/dataset-cnn.pt data/digitsm32/dataset-cnn.pt",
    ),
    "srgan": ("configs/srgan/photos-x4.yaml", "data/photos-sr/manifest.json"),
}


def image_to_image(names: tuple[str, ...] = tuple(IMAGE_TO_IMAGE)) -> None:
    """The three image → image demo presets as ``make demo-*`` trains them (data written first, not timed): wall
    clock, img/s, and every held-out evaluation (Pix2Pix L1 against the input's L1, CycleGAN's label
    preservation, SR PSNR/SSIM against bicubic)."""
    import json

    from orchestrator.config import load_config
    from orchestrator.train.run import train

    for name in names:
        preset, target = IMAGE_TO_IMAGE[name]
        subprocess.run(["make", "-s", *target.split()], cwd=ROOT, check=True)
        run_dir = Path(tempfile.mkdtemp()) / name
        cfg = load_config(ROOT / preset, ["tracking.progress_bar=false", "tracking.wandb.mode=disabled"])
        t0 = time.perf_counter()
        result = train(cfg, run_dir)
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rate = [r["perf/img_per_s"] for r in rows if "perf/img_per_s" in r][-5:]
        print(f"{name}: {preset}, {result.nimg / 1000:g} kimg in {seconds:.0f} s, "
              f"{sum(rate) / max(len(rate), 1):.0f} img/s over the last logs")  # fmt: skip
        for row in result.evaluations:
            shown = {k[5:]: round(v, 4) for k, v in row.items() if k.startswith("eval/") and isinstance(v, float)}
            print(f"  {row['kimg']:6.1f} kimg: {shown}")


def stability_cost(steps: int = 60) -> None:
    """Training img/s of the DCGAN digits demo (32×32, batch 64) with each stability option against the plain
    run: unrolled GAN at k = 1, 5 and 10 look-ahead steps (the paper's), packing, minibatch discrimination and
    feature matching. One process, the steady rate of the last third of ``steps``."""
    from orchestrator.config import load_config
    from orchestrator.data.write import write_shards
    from orchestrator.train.run import train

    os.environ["WANDB_MODE"] = "disabled"
    cases = {
        "plain": [],
        "unroll k=1": ["loss.unroll_steps=1"],
        "unroll k=5": ["loss.unroll_steps=5"],
        "unroll k=10": ["loss.unroll_steps=10"],
        "pack m=2": ["loss.pack=2"],
        "minibatch discrimination B=100": ["model.mbdisc_kernels=100"],
        "feature matching (added)": ["loss.feature_matching=added"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        write_shards("builtin:digits", Path(tmp) / "d", resolution=32, shard_size=256)
        print(f"\n| option | img/s ({_torch_threads()} threads) | × plain |\n|---|---|---|")
        plain = None
        for name, extra in cases.items():
            cfg = load_config(ROOT / "configs/dev/dcgan-digits.yaml", [
                f"data.shards={tmp}/d/train-*.tar", "data.num_classes=0", f"train.stop_at_step={steps}",
                "tracking.progress_bar=false", "tracking.wandb.mode=disabled", "eval.enabled=false",
                f"tracking.log_every={steps // 3}", "checkpoint.every_kimg=1000", "tracking.sample_every_kimg=1000",
                *extra,
            ])  # fmt: skip
            run_dir = Path(tmp) / name.replace(" ", "_")
            train(cfg, run_dir)
            rate = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["perf/img_per_s"]
            plain = plain or rate
            print(f"| {name} | {_rate(rate)} | {rate / plain:.2f} |", flush=True)


BENCHMARKS = {
    "dev_loader_settings": dev_loader_settings,
    "stylegan2_1024_forward": stylegan2_1024_forward,
    "parallel_capacity": parallel_capacity,
    "ddp_scaling": ddp_scaling,
    "strategy_memory": strategy_memory,
    "evaluator_overhead": evaluator_overhead,
    "nonfinite_guard_overhead": nonfinite_guard_overhead,
    "compile_demo": compile_demo,
    "stylegan2_cifar_compile": stylegan2_cifar_compile,
    "data_stream": data_stream,
    "ada_small_data": ada_small_data,
    "ada_small_data_stylegan2": ada_small_data_stylegan2,
    "augment_cost": augment_cost,
    "image_to_image": image_to_image,
    "stability_cost": stability_cost,
}


def cpu_model() -> str:
    """The processor's model name (figures are comparable only on one processor)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", choices=[[], *BENCHMARKS], help="benchmarks to run (default: all)")
    p.add_argument("--presets", nargs="+", choices=list(SCALING_PRESETS), help="ddp_scaling: these presets only")
    p.add_argument("--profile", action="store_true", help="ddp_scaling: print rank 0's profile of each run")
    p.add_argument("--compile", action="store_true", help="ddp_scaling: train.compile=true in every run")
    args = p.parse_args()
    for name in args.names or BENCHMARKS:
        print(f"## {name} ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {cpu_model()})", flush=True)
        if name == "ddp_scaling":
            ddp_scaling(tuple(args.presets or SCALING_PRESETS), args.profile, args.compile)
        else:
            BENCHMARKS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
