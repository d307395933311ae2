"""The benchmark scripts under bench/ still run against the code they measure: every script imports (so a
renamed or re-signed function fails here, not on the day someone reruns a figure), and the ones whose
figures the docs quote with the least machinery run one tiny real configuration that writes its raw file
with the machine record. No timing is asserted."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py"))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_every_bench_script_imports(path):
    module = _load(path)
    if path.stem not in ("results_io", "official_step"):  # helpers, not scripts
        assert callable(getattr(module, "main", None)), f"{path.name} has no main()"


def _raw(path: Path) -> dict:
    record = json.loads(path.read_text())
    machine = record["machine"]
    assert machine["lscpu"]["model_name"] and machine["cpu_count"] and len(record["load_average_start"]) == 3
    assert machine["versions"]["torch"]
    return record["figures"]


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_bench_encode_times_the_job_stages_and_commits_each_image_once(tmp_path, monkeypatch, engine):
    module = _load(BENCH / "bench_encode.py")
    monkeypatch.setattr(sys, "argv", ["bench_encode.py"])
    out = tmp_path / "encode.json"
    assert module.main(["--variant", "small", "--images", "2", "--batch-size", "2", "--skip-job",
                        "--encode-engine", engine, "--engine-cache", str(tmp_path / "engines"),
                        "--json", str(out)]) == 0
    figures = _raw(out)
    assert figures["images"] == 2  # the breakdown asserts the table holds exactly one row per image
    assert figures["encoder"] == ("torch-fp32" if engine == "torch" else "openvino-f32")
    assert figures["encode_s"] > 0 and figures["write_s"] > 0 and figures["bytes_per_image"] > 0


def test_bench_refine_reports_every_start_mode(tmp_path, monkeypatch, shared_dir):
    module = _load(BENCH / "bench_refine.py")
    monkeypatch.setattr(sys, "argv", ["bench_refine.py"])
    out = tmp_path / "refine.json"
    assert module.main(["GrabCut", "--data", str(shared_dir / "data"), "--limit", "2", "--max-side", "160",
                        "--pre-clicks", "2", "--max-clicks", "2", "--out", str(out)]) == 0
    figures = _raw(out)
    data = figures["datasets"]["GrabCut"]
    assert len(data["records"]) == 2
    for mode in module.MODES:
        assert 0 <= data["summary"][mode]["noc"] <= 2 and 0 <= data["summary"][mode]["success"] <= 1
        assert all(0 <= r[mode] <= 2 for r in data["records"])


def test_bench_refine_defaults_to_every_dataset():
    module = _load(BENCH / "bench_refine.py")
    assert module.parse_args([]).datasets == list(module.DATASETS)
    assert module.parse_args(["Berkeley"]).datasets == ["Berkeley"]
    with pytest.raises(SystemExit):
        module.parse_args(["COCO"])


def test_profile_click_network_lists_the_layers_of_the_compiled_network(tmp_path):
    out = tmp_path / "profile.json"
    assert _load(BENCH / "profile_click_network.py").main(["--size", "64", "--runs", "1", "--top", "3",
                                                             "--out", str(out)]) == 0
    figures = _raw(out)
    assert figures["layers_ms"] and {"name", "type", "exec", "ms"} <= set(figures["layers_ms"][0])
    assert sum(r["ms"] for r in figures["layers_ms"]) == pytest.approx(figures["total_ms_median"], abs=0.01 * len(figures["layers_ms"]))


def test_bench_encode_runtime_reports_the_runtime_against_torch(tmp_path, monkeypatch):
    """The product's openvino engine, converted once for two sizes, computes the torch encoder's function
    (relative RMS far below bf16's), and the script says which engine each path ran on."""
    module = _load(BENCH / "bench_encode_runtime.py")
    monkeypatch.setattr(sys, "argv", ["bench_encode_runtime.py"])
    out = tmp_path / "encode_runtime.json"
    assert module.main(["--variant", "small", "--sizes", "64,96x64", "--repeats", "1", "--out", str(out)]) == 0
    raw = _raw(out)
    assert raw["convert_s"] > 0 and raw["from_cache_s"] > 0
    assert [r["size"] for r in raw["rows"]] == ["64x64", "96x64"]
    for row in raw["rows"]:
        assert row["torch_fp32_ms"] > 0 and row["openvino_f32_ms"] > 0 and row["openvino_f32_engine"] == "openvino-f32"
        assert len(row["openvino_f32_rel_rms"]) == 4 and max(row["openvino_f32_rel_rms"]) < 1e-4


def test_bench_engine_quality_gates_a_candidate_with_signed_noc_and_intervals(tmp_path, monkeypatch, shared_dir):
    """The quality gate end to end on a tiny run (a seeded small model, two GrabCut images, three clicks), and
    its verdict: signed (needing fewer clicks is no failure), the per-click IoU bound kept."""
    import torch

    from interformer.checkpoint import load_model, save_checkpoint

    module = _load(BENCH / "bench_engine_quality.py")
    torch.manual_seed(0)
    ckpt = tmp_path / "small.pth"
    save_checkpoint(load_model(None, variant="small"), ckpt)
    monkeypatch.setattr(sys, "argv", ["bench_engine_quality.py"])
    out = tmp_path / "gate.json"
    args = ["--checkpoint", str(ckpt), "--engine", "openvino-f32", "--datasets", "GrabCut", "--data-root",
            str(shared_dir / "data"), "--limit", "2", "--max-clicks", "3", "--engine-cache", str(tmp_path / "engines")]
    assert module.main([*args, "--out", str(out)]) == 0  # openvino-f32 gives fp32's masks: the gate passes
    assert _raw(out)["datasets"]["GrabCut"]["gate_passed"]
    failed = tmp_path / "failed.json"  # an IoU bound no candidate meets: the gate fails, and the exit status says so
    assert module.main([*args, "--min-iou", "1.01", "--out", str(failed)]) == 1
    assert not _raw(failed)["datasets"]["GrabCut"]["gate_passed"]
    figures = _raw(out)
    assert figures["engine"] == "openvino-f32"
    rows = figures["datasets"]["GrabCut"]
    assert len(rows["exact"]["per_sample_noc85"]) == len(rows["fast"]["per_sample_noc90"]) == 2
    for t in ("85", "90"):
        low, high = rows[f"delta_noc{t}_ci95"]
        assert low <= rows[f"delta_noc{t}"] <= high
    assert rows["per_click_iou_vs_fp32"]["clicks"] >= 2 and rows["per_click_iou_vs_fp32"]["mean"] > 0.99

    def verdict(exact, fast, iou=0.999):
        both = {"exact": {"noc85": exact, "noc90": exact, "per_sample_noc85": [exact], "per_sample_noc90": [exact]},
                "fast": {"noc85": fast, "noc90": fast, "per_sample_noc85": [fast], "per_sample_noc90": [fast]},
                "per_click_iou_vs_fp32": {"mean": iou}}
        return module.gate(both)["gate_passed"]

    assert verdict(10.0, 9.5)  # fewer clicks than fp32
    assert verdict(10.0, 10.05) and not verdict(10.0, 10.06)
    assert not verdict(10.0, 10.0, iou=0.994)
