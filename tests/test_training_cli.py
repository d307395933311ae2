"""jobs/train.py command line: built from TrainConfig, every option documented, bad values refused clearly."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from interformer.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("train_job_cli", ROOT / "jobs/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_option_has_help(job):
    parser = job.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings


def test_defaults_are_the_official_recipe(job, tmp_path):
    cfg, args = job.parse_config(["--out-dir", str(tmp_path), "--data", "folder:imgs,masks=gt"])
    assert isinstance(cfg, TrainConfig) and not args.local
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_iters, cfg.optim.betas) == (1e-4, 0.05, 1500,
                                                                                              (0.9, 0.999))
    assert (cfg.augment.crop_size, cfg.augment.ratio_range, cfg.augment.cat_max_ratio) == (512, (0.5, 2.0), 0.75)
    assert (cfg.clicks.max_extra_clicks, cfg.clicks.click_decay, cfg.clicks.sfc_inner_k) == (20, 0.6, 1.7)
    assert (cfg.loss.aux_weight, cfg.max_iters, cfg.batch_size) == (0.4, 320_000, 4)
    assert Path(cfg.data[0].path).is_absolute() and Path(cfg.out_dir).is_absolute()


def test_options_reach_nested_configs(job, tmp_path):
    cfg, _ = job.parse_config(["--out-dir", str(tmp_path), "--data", "folder:a,masks=b", "--data",
                               "coco:x.json,images=y", "--crop-size", "256", "--ratio-range", "0.8", "1.2",
                               "--no-photometric", "--lr", "3e-4", "--use-gpu", "false", "--aux-weight", "0"])
    assert [d.kind for d in cfg.data] == ["folder", "coco"]
    assert cfg.augment.crop_size == 256 and cfg.augment.ratio_range == (0.8, 1.2) and not cfg.augment.photometric
    assert cfg.optim.lr == 3e-4 and cfg.use_gpu is False and cfg.loss.aux_weight == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--data", "folder:a,masks=b", "--crop-size", "100"], "multiple of 32"),
    (["--data", "voc:a"], "must start with"),
    (["--data", "folder:a,masks=b", "--features", "db"], "needs --frozen-backbone"),
    (["--data", "folder:a,masks=b", "--eval-interval", "10"], "needs --eval-data"),
    (["--data", "folder:a,masks=b", "--stop-at", "0"], "--stop-at: must be an integer >= 1"),
    (["--data", "folder:a,masks=b", "--max-iters", "5", "--stop-at", "10"], "stop_at must be in 1..max_iters"),
    (["--data", "folder:a,masks=b", "--variant", "huge"], "unknown InterFormer variant"),
    (["--data", "folder:a,masks=b", "--eval-data", "held", "--eval-protocol", "bogus"],
     "eval_protocol must be one of ritm, interformer, got 'bogus'"),
])
def test_bad_values_are_refused(job, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        job.parse_config(["--out-dir", str(tmp_path), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_training_knows_the_evaluation_protocols():
    from interformer.training.config import EVAL_PROTOCOLS
    from pipeline.evaluation import PROTOCOLS

    assert set(EVAL_PROTOCOLS) == set(PROTOCOLS)
