"""benchmarks/gpu.sh's CPU twin: the same driver, case process and table as on a GPU, at a tiny size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run_measures_the_dev_preset_on_cpu(tmp_path):
    env = {**os.environ, "GF_GPU_BENCH_DRY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "gpu.md").read_text()
    assert report in done.stdout
    row = re.search(
        r"^\| dev \| 8 \| False \| 1 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+% \| \d+ \| ok \|$", report, re.M
    )
    assert row, report
    sec_per_kimg, img_per_s, peak = map(float, row.groups())
    assert sec_per_kimg > 0 and img_per_s > 0 and peak > 0
    assert abs(sec_per_kimg * img_per_s / 1000 - 1) < 0.05  # both from the same timed window (printed rounded)
    assert "NVlabs/stylegan2-ada-pytorch" in report and "154.3-161.6" in report and "14.57" in report
