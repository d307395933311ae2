"""Shared test fixtures: paths to the team's shared data and a small random-initialised model."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the team's shared folder is missing: expected {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def small_model():
    """A randomly initialised 'small' InterFormer (eval mode, CPU)."""
    import torch

    from interformer import load_model

    torch.manual_seed(0)
    return load_model(None, variant="small", device="cpu")


@pytest.fixture(scope="session")
def official_light(shared_dir, tmp_path_factory):
    """The Light model with the official fixtures' seeded random weights (rebuilt bit-exactly from their
    init recipe, loaded through the official-checkpoint loader), and the fixtures folder."""
    import importlib.util

    import torch

    from interformer import load_model

    fixtures = shared_dir / "fixtures" / "official_interformer"
    spec = importlib.util.spec_from_file_location("rebuild_weights", fixtures / "rebuild_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp("ckpt") / "light_random.pth"
    module.save_official(str(fixtures / "light_init_spec.json"), str(path))
    torch.set_num_threads(2)
    return load_model(path), fixtures


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """One real Label Studio server for the whole test session (tests/ls_server.py); stopped at the end."""
    from ls_server import start_label_studio

    server = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    yield server
    server.stop()
