"""What a careful user expects of a run: refusals that change nothing, resumes on the same
data, Ctrl-C, tiny inputs, final validation, clean overwrites, reproducible runs."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_train, tiny_overrides

from neusdf.checkpoint import DATA_KEY, CheckpointError
from neusdf.mesh_io import ShapeError
from neusdf.pipeline import MIN_SURFACE_POINTS, train


def _snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _cloud(path, n: int):
    rng = np.random.default_rng(0)
    d = rng.normal(size=(n, 3))
    np.savetxt(path, d / np.linalg.norm(d, axis=1, keepdims=True))
    return path


@pytest.fixture(scope="module")
def run5(tmp_path_factory, sphere_mesh_path):
    """Five steps with validation every three: the last step is not a validation step."""
    out = tmp_path_factory.mktemp("run5")
    metrics = train(compose_train([*tiny_overrides(sphere_mesh_path), "trainer.max_steps=5"], out))
    return out, metrics


def test_checkpoint_records_its_data(run5, sphere_mesh_path):
    out, _ = run5
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt[DATA_KEY]["path"] == str(sphere_mesh_path.resolve())
    assert len(ckpt[DATA_KEY]["fingerprint"]) == 16


def test_resume_on_other_data_is_refused_unless_asked(run5, sphere_points_path, tmp_path):
    out, _ = run5
    last = out / "checkpoints" / "last.ckpt"
    other = [*tiny_overrides(sphere_points_path), f"ckpt_path={last}", "trainer.max_steps=6"]
    with pytest.raises(CheckpointError) as e:
        train(compose_train(other, tmp_path / "refused"))
    msg = str(e.value)
    assert "sphere.obj" in msg and "sphere.npz" in msg and "resume_other_data=true" in msg
    assert not (tmp_path / "refused").exists()
    metrics = train(compose_train([*other, "resume_other_data=true"], tmp_path / "asked"))
    assert metrics["timing"]["steps"] == 6


def test_the_last_step_is_validated(run5):
    out, _ = run5
    rows = (out / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col, step = header.index("val/chamfer_l1"), header.index("step")
    validated = [int(r.split(",")[step]) for r in rows[1:] if r.split(",")[col]]
    assert validated == [2, 4]  # after steps 3 and 5 (the csv counts from 0)
    assert (out / "checkpoints" / "best.ckpt").is_file()


def test_resume_speed_counts_this_run_and_bar_counts_steps(run5, sphere_mesh_path, tmp_path, capfd):
    out, _ = run5
    overrides = [
        *tiny_overrides(sphere_mesh_path),
        f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
        "trainer.max_steps=7",
        "callbacks.progress_bar.refresh_rate=1",
    ]
    metrics = train(compose_train(overrides, tmp_path / "resumed"))
    t = metrics["timing"]
    assert t["steps"] == 7 and t["resumed_from_step"] == 5
    assert t["steps_per_second"] == pytest.approx(2 / t["fit_seconds"])
    captured = capfd.readouterr()
    err = captured.out + captured.err
    assert "7/7" in err and "/?" not in err.split("Training")[-1]
    # Lightning's noise: the litlogger tip and the weights_only notice
    assert "litlogger" not in err and "weights_only" not in err


@pytest.mark.parametrize("steps", [0, -1])
def test_max_steps_below_one_is_refused(tmp_path, sphere_mesh_path, steps):
    cfg = compose_train([*tiny_overrides(sphere_mesh_path), f"trainer.max_steps={steps}"], tmp_path)
    with pytest.raises(ValueError, match=f"trainer.max_steps must be an integer >= 1.*got {steps}"):
        train(cfg)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "64-true"])
def test_precision_other_than_float32_is_refused(tmp_path, sphere_mesh_path, precision):
    cfg = compose_train(
        [*tiny_overrides(sphere_mesh_path), f"trainer.precision={precision}"], tmp_path
    )
    with pytest.raises(ValueError, match=f"trainer.precision must be 32-true.*got '{precision}'"):
        train(cfg)
    assert not any(tmp_path.iterdir())


def test_ctrl_c_saves_last_and_says_how_to_resume(tmp_path, sphere_mesh_path, capsys):
    overrides = [
        *tiny_overrides(sphere_mesh_path),
        "+callbacks.interrupt._target_=run_helpers.InterruptAt",
        "+callbacks.interrupt.step=2",
    ]
    with pytest.raises(SystemExit):
        train(compose_train(overrides, tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    err = capsys.readouterr().err
    assert f"interrupted at step 2: saved {last}" in err
    assert f"ckpt_path={last}" in err and f"data.path={sphere_mesh_path}" in err
    assert f"python -m neusdf.extract ckpt={last}" in err


def test_too_few_points_are_refused_and_caps_are_logged(tmp_path, caplog):
    tiny = _cloud(tmp_path / "three.xyz", 3)
    with pytest.raises(ShapeError, match=f"has 3 points; at least {MIN_SURFACE_POINTS} are needed"):
        train(compose_train([*tiny_overrides(tiny), "model.K=2"], tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    small = _cloud(tmp_path / "forty.xyz", 40)
    overrides = [*tiny_overrides(small), "model.K=2", "trainer.max_steps=1", "extract.score=false"]
    with caplog.at_level(logging.WARNING):
        train(compose_train(overrides, tmp_path / "b"))
    assert "model.num_points capped at 40 (the surface sample's size), 256 asked" in caplog.text


def test_model_errors_are_the_models_own(tmp_path, sphere_mesh_path):
    base = tiny_overrides(sphere_mesh_path)
    with pytest.raises(ValueError, match=r"^model.K=300 exceeds the number of neural points"):
        train(compose_train([*base, "model.K=300"], tmp_path))
    with pytest.raises(
        ValueError, match=r"model.hiden is not an option .*did you mean model.hidden"
    ):
        train(compose_train([*base, "+model.hiden=3"], tmp_path))
    with pytest.raises(ValueError, match=r"^model.K must be of type int, got 'abc'$"):
        train(compose_train([*base, "model.K=abc"], tmp_path))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.hiden=3", "error: model.hiden is not a config key; did you mean model.hidden?"),
        ("trainer.max_step=3", "error: trainer.max_step is not a config key; did you mean "),
    ],
)
def test_unknown_keys_name_the_nearest(monkeypatch, capsys, tmp_path, override, expected):
    from neusdf import command

    monkeypatch.setattr(sys, "argv", ["train.py", override, f"hydra.run.dir={tmp_path / 'r'}"])
    with pytest.raises(SystemExit) as e:
        command.main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(expected) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_overwrite_replaces_the_run_cleanly(tmp_path, sphere_mesh_path):
    overrides = [*tiny_overrides(sphere_mesh_path), "logger=tensorboard", "trainer.max_steps=3"]
    train(compose_train(overrides, tmp_path))
    train(compose_train([*overrides, "overwrite=true"], tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_a_refused_command_leaves_the_run_directory_as_it_was(run5, sphere_mesh_path):
    out, _ = run5
    (out / ".hydra").mkdir(exist_ok=True)
    (out / ".hydra" / "config.yaml").write_text("old: config\n")
    (out / "train.log").write_text("old log\n")
    before = _snapshot(out)
    base = ["debug=default", f"data.path={sphere_mesh_path}", f"hydra.run.dir={out}"]
    # outputs exist; an unknown model option (even with overwrite=true, which would clear it)
    for extra, expected in [
        ([], "mesh.ply' exists; pass overwrite=true"),
        (["overwrite=true", "+model.hiden=3"], "did you mean model.hidden?"),
    ]:
        proc = _cli(*base, *extra)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 1 and expected in output, output
        assert "Error in call to target" not in output and "Traceback" not in output
        assert _snapshot(out) == before


def test_deterministic_runs_are_identical(tmp_path, sphere_mesh_path):
    overrides = [*tiny_overrides(sphere_mesh_path), "deterministic=true", "trainer.max_steps=4"]
    states = []
    for name in ("a", "b"):
        train(compose_train(overrides, tmp_path / name))
        states.append(torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False))
    a, b = (s["state_dict"] for s in states)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_deterministic_on_a_gpu_runs_the_reference_op(tmp_path):
    from neusdf.pipeline import _deterministic_backend

    cfg = compose_train(["trainer.accelerator=gpu", "deterministic=true"], tmp_path)
    _deterministic_backend(cfg)
    assert cfg.model.backend == "reference" and cfg.trainer.deterministic is True
    cpu = compose_train(["trainer.accelerator=cpu", "deterministic=true"], tmp_path)
    _deterministic_backend(cpu)
    assert cpu.model.backend == "compiled"
