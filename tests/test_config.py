"""Config composition, overrides, resolvers and the error for unknown keys."""

from __future__ import annotations

import gc
import importlib.util
import subprocess
import sys

import pytest
from conftest import ROOT, compose_train
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf


def test_default_config_composes_and_resolves(tmp_path):
    cfg = compose_train(["trainer.accelerator=cpu"], tmp_path)
    OmegaConf.resolve(cfg)
    for group in ("data", "model", "loss", "optim", "trainer", "logger", "callbacks"):
        assert group in cfg
    assert cfg.trainer.inference_mode is False
    assert "tensorboard" in cfg.logger
    assert cfg.model.backend == "compiled"
    assert (ROOT / "data" / "default_shape.ply").samefile(cfg.data.path)
    assert str(cfg.callbacks.model_checkpoint.dirpath).startswith(str(tmp_path))


def test_overrides_reach_the_objects(tmp_path, sphere_points_path):
    cfg = compose_train(
        [
            f"data.path={sphere_points_path}",
            "model.num_points=300",
            "model.K=5",
            "trainer.max_steps=7",
            "loss.eikonal=0.25",
            "trainer.accelerator=cpu",
            "model.backend=reference",
        ],
        tmp_path,
    )
    assert cfg.loss.eikonal == 0.25
    dm = instantiate(cfg.data)
    assert dm.path == str(sphere_points_path)
    net = instantiate(cfg.model, init=None)
    assert net.K == 5 and net.num_points == 300
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == 7


def test_sizes_follow_the_accelerator(tmp_path):
    cpu = compose_train(["trainer.accelerator=cpu"], tmp_path)
    gpu = compose_train(["trainer.accelerator=gpu"], tmp_path)
    # the GPU's samples per step and grid are larger; the neural point count follows the
    # input (auto) on both; the GPU takes fewer, larger steps (each replayed as a CUDA graph)
    # ("auto" picks the search by device and point count: the tiles on a GPU, the grid on a CPU)
    assert gpu.model.num_points == cpu.model.num_points == "auto"
    assert gpu.model.winding_resolution > cpu.model.winding_resolution
    assert gpu.data.num_surface > cpu.data.num_surface
    samples = [c.trainer.max_steps * c.data.num_surface for c in (gpu, cpu)]
    assert samples[0] > samples[1]
    assert gpu.model.search == cpu.model.search == "auto"


def test_noisy_experiment_trusts_normals_over_positions(tmp_path):
    base = compose_train(["trainer.accelerator=gpu"], tmp_path)
    noisy = compose_train(["trainer.accelerator=gpu", "experiment=noisy"], tmp_path)
    # the preset fixes what the default leaves to the input's measurement (neusdf.adapt)
    assert base.loss.surface == base.loss.eikonal == base.model.num_points == "auto"
    assert noisy.loss.surface < 10.0 and noisy.loss.eikonal > 0.1
    assert noisy.model.num_points < 16384
    assert noisy.loss.normal == base.loss.normal  # the normals keep their full weight
    # the command line still wins over the experiment
    over = compose_train(
        ["trainer.accelerator=gpu", "experiment=noisy", "loss.surface=2.0"], tmp_path
    )
    assert over.loss.surface == 2.0
    # the preset is what the default picks for input measured as noisy, on either device
    from neusdf.adapt import auto_settings
    from neusdf.geometry import InputStats

    noisy_input = InputStats(100_000, 0.004, 0.003, True)
    for accel in ("gpu", "cpu"):
        preset = compose_train([f"trainer.accelerator={accel}", "experiment=noisy"], tmp_path)
        auto = auto_settings(noisy_input, gpu=accel == "gpu")
        assert {k: OmegaConf.select(preset, k) for k in auto} == auto


def test_debug_and_ddp_configs(tmp_path):
    fdr = compose_train(["debug=fdr"], tmp_path)
    assert fdr.trainer.fast_dev_run is True
    ddp = compose_train(["trainer=ddp", "trainer.devices=2"], tmp_path)
    assert ddp.trainer.strategy._target_.endswith("DDPStrategy") and ddp.trainer.devices == 2
    assert ddp.trainer.inference_mode is False


def test_unknown_key_is_rejected(tmp_path):
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_train(["model.no_such_key=3"], tmp_path)


def test_unknown_key_on_the_command_line_gives_a_short_message():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "no_such_key=1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_importing_train_py_leaves_the_garbage_collector_alone():
    # a job of the command line holds collection off while it imports the pipeline and then
    # freezes the imported objects (neusdf.command); importing train.py as a module does neither
    frozen = gc.get_freeze_count()
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.train is not None
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_command_line_imports_the_pipeline_only_when_a_job_runs():
    # a multirun's own process composes configs and starts the launcher's workers: it must
    # not pay for torch and Lightning, or the workers' imports queue behind its own; and the
    # job imports them inside its garbage-collector hold (neusdf.command)
    code = (
        "import sys, neusdf.command; "
        "heavy = ('torch', 'lightning', 'neusdf.pipeline', 'trimesh'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout


def test_wheel_lists_every_config_group():
    # a group missing from pyproject.toml's packages would be left out of (or only warned
    # about in) the wheel, whose commands then fail to compose their config
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    groups = {p.name for p in (ROOT / "configs").iterdir() if p.is_dir()}
    assert {f"neusdf.configs.{g}" for g in groups} <= set(setup["packages"])
    assert setup["package-dir"] == {
        "neusdf.csrc": "csrc",
        "neusdf.configs": "configs",
        "neusdf.assets": "data",
    }


def test_readme_commands_are_ones_that_work():
    readme = (ROOT / "README.md").read_text()
    # resuming needs the checkpoint's data.path (other data is refused)
    resume = [line for line in readme.splitlines() if "ckpt_path=" in line]
    assert resume and all("data.path=" in line for line in resume)
    # the extraction example writes into the run directory, not the working directory
    assert "output=mesh.ply" not in readme and "metrics=metrics.json" not in readme
    assert "outputs/debug/runs/" in readme


def test_cfg_job_resolve_shows_values():
    assert "--cfg job --resolve" in (ROOT / "README.md").read_text()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--cfg", "job", "--resolve"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "gpu_or_cpu" not in proc.stdout and "num_points: " in proc.stdout


def test_auto_settings_follow_the_measured_noise():
    from neusdf.adapt import auto_settings
    from neusdf.geometry import InputStats

    clean = auto_settings(InputStats(100_000, 0.002, 0.0002, True), gpu=True)
    noisy = auto_settings(InputStats(100_000, 0.004, 0.003, True), gpu=True)
    assert clean == {"model.num_points": 16384, "loss.surface": 10.0, "loss.eikonal": 0.1}
    assert noisy == {"model.num_points": 8192, "loss.surface": 1.0, "loss.eikonal": 1.0}
    assert (
        auto_settings(InputStats(100_000, 0.004, 0.003, True), gpu=False)["model.num_points"]
        == 2048
    )
