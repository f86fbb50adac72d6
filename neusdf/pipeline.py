"""Config -> trained run: fit a neural SDF to one shape, extract its mesh and score it.

:func:`train` is the whole run, in three steps that can also be called on their own:
:func:`build` (data, network, Lightning module and trainer), :func:`fit` and :func:`finalise`
(mesh, metrics and ``metrics.json`` on rank 0). The Hydra command line that runs it
(``train.py`` at the checkout's root and the ``neusdf-train`` command) is
:mod:`neusdf.command`::

    python train.py                                   # the default shape, sized for the device
    python train.py data.path=scan.ply model.num_points=16384 model.K=8 trainer.max_steps=3000
    python train.py debug=fdr                         # one step of everything
    python train.py trainer=ddp trainer.devices=2     # data parallel (Lightning DDP)

Outputs go to the run directory (``outputs/train/runs/<date>_<time>/``): checkpoints
(``checkpoints/last.ckpt``, ``best.ckpt``), TensorBoard logs, ``mesh.ply`` in the input's
coordinates and ``metrics.json`` (reconstruction metrics against the input, plus timings).

Nothing is written into the run directory until every check has passed (config values, the
outputs it would replace, the data, the model, the checkpoint to resume from): a refused run
leaves the directory as it was. With ``overwrite=true`` the earlier run's files are removed
first (see :data:`RUN_FILES`), so the directory then holds the new run only.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from neusdf.adapt import resolve_auto
from neusdf.callbacks import RunRecorder, last_checkpoint_path
from neusdf.checkpoint import check_same_data, data_record, read_checkpoint
from neusdf.config import (
    configure_runtime,
    is_main_process,
    on_gpu,
    register_resolvers,
)
from neusdf.data import MIN_SURFACE_POINTS, ShapeDataModule
from neusdf.distributed import check_sigterm_on_host, start_early_connect
from neusdf.mesh_io import ShapeError, check_writable, save_json, save_mesh
from neusdf.meshing import extract_mesh, trim_of
from neusdf.metrics import SurfaceSet, evaluate, format_table
from neusdf.model import PointInit
from neusdf.module import SDFModule
from neusdf.ops.build import load_library
from neusdf.process_info import resident_memory_mib

__all__ = [
    "MIN_SURFACE_POINTS",
    "RUN_FILES",
    "Run",
    "build",
    "check_config",
    "check_outputs",
    "finalise",
    "fit",
    "multirun_device",
    "train",
]

log = logging.getLogger("neusdf.train")
register_resolvers()

# Fewest surface points that define a surface: the neighbourhood of the PCA normal estimate
# (neusdf.geometry.estimate_normals) and of the neural points' spacing. Fewer is refused.
# What a run writes into its directory; overwrite=true removes these first (nothing else).
RUN_FILES = (
    "checkpoints",
    "tensorboard",
    "csv",
    "lightning_logs",
    ".hydra",
    "train.log",
    "mesh.ply",
    "mesh.obj",
    "metrics.json",
)


@dataclass
class Run:
    """What :func:`build` makes: the data, the module around the network, the trainer."""

    data: ShapeDataModule
    module: SDFModule
    trainer: L.Trainer
    # seconds of build's parts: "load" (read, normalise, measure, estimate normals) and
    # "init" (op, neural points, winding-number grid, module and trainer)
    timing: dict[str, float]
    # the process's resident host memory when train() began (MiB; None off Linux)
    host_memory_mib_at_start: float | None = None


def _build_op(backend: str) -> None:
    """Builds the compiled op once, before Lightning starts any other rank."""
    if backend != "compiled":
        return
    t0 = time.perf_counter()
    load_library()
    log.info("compiled op ready (%.1f s)", time.perf_counter() - t0)


# trainer.precision values that train in float32 (Lightning's spellings of it).
_FLOAT32_PRECISIONS = ("32-true", "32", 32)


def check_config(cfg: DictConfig) -> None:
    """Refuses (ValueError) settings that would not end (``trainer.max_steps`` below 1) or
    that the model cannot train with (``trainer.precision`` other than float32)."""
    steps = cfg.trainer.max_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"trainer.max_steps must be an integer >= 1 (training runs until it), got {steps!r}"
        )
    # Mixed or half precision would reach the op in 16-bit floats (it computes in float32 or
    # float64) and bypass the loss scaling that manual_backward applies: the step calls
    # backward itself so that it can be one CUDA graph.
    precision = cfg.trainer.get("precision", "32-true")
    if precision not in _FLOAT32_PRECISIONS:
        raise ValueError(f"trainer.precision must be 32-true (float32), got {precision!r}")


def _unknown_option(e: TypeError, target: str, group: str) -> ValueError | None:
    """A readable error for an option the target does not take, naming the nearest one."""
    m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
    if m is None:
        return None
    try:
        valid = [p for p in inspect.signature(get_class(target)).parameters if p != "self"]
    except Exception:  # the target cannot be inspected: no suggestion
        valid = []
    close = difflib.get_close_matches(m.group(1), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {group}.{close[0]}?" if close else ""
    return ValueError(f"{group}.{m.group(1)} is not an option of {target}{hint}")


_PLAIN_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _check_types(node: DictConfig, group: str) -> None:
    """Raises ValueError for an option whose value is not of its plainly annotated type."""
    try:
        params = inspect.signature(get_class(str(node.get("_target_")))).parameters
    except Exception:  # the target cannot be inspected: nothing to check
        return
    for key, p in params.items():
        ann = (
            p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        )
        kind = _PLAIN_TYPES.get(ann)
        if kind is None or key not in node:
            continue
        value = node[key]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok and value is not None:
            raise ValueError(f"{group}.{key} must be of type {ann}, got {value!r}")


def _instantiate(node: DictConfig, group: str, **kwargs):
    """``hydra.utils.instantiate`` that raises the target's own error, not Hydra's wrapper.

    ValueError (and its subclasses) come through as they are; an unknown option (TypeError)
    becomes a ValueError naming the closest valid option; a value of the wrong type for a
    plainly annotated option (``model.K=abc``) is refused before the call.
    """
    _check_types(node, group)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        if isinstance(cause, TypeError):
            err = _unknown_option(cause, str(node.get("_target_")), group)
            if err is not None:
                raise err from None
        raise


def _check_checkpoint_dir(cfg: DictConfig) -> None:
    """Refuses to write checkpoints over an earlier run's, unless resuming from that run."""
    cb = (cfg.get("callbacks") or {}).get("model_checkpoint")
    if cb is None or cfg.overwrite:
        return
    ckpt_dir = Path(cb.dirpath)
    existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    resuming_here = cfg.ckpt_path is not None and Path(cfg.ckpt_path).parent == ckpt_dir
    if existing and not resuming_here:
        raise FileExistsError(
            f"'{ckpt_dir}' already holds checkpoints ({existing[0].name}, ...); "
            "pass overwrite=true to replace them or ckpt_path=... to resume"
        )


def _output_paths(cfg: DictConfig) -> tuple[Path, Path]:
    """The run's mesh and metrics files."""
    out_dir = Path(cfg.paths.output_dir)
    return out_dir / f"mesh.{cfg.extract.format}", out_dir / "metrics.json"


def check_outputs(cfg: DictConfig) -> None:
    """Refuses (FileExistsError) to replace an earlier run's outputs without ``overwrite``."""
    for p in _output_paths(cfg):
        check_writable(p, cfg.overwrite)
    _check_checkpoint_dir(cfg)


def _container(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def _check_surface(dm: ShapeDataModule, cfg: DictConfig) -> None:
    """Says when the point count is capped (too small an input is refused by ``dm.load``)."""
    n = len(dm.surface.points)
    asked = cfg.model.get("num_points")
    if isinstance(asked, int) and asked > n:
        log.warning(
            "model.num_points capped at %d (the surface sample's size), %d asked%s",
            n,
            asked,
            "" if dm.shape.is_mesh else " (a point cloud is used as given)",
        )


def _check_resume(cfg: DictConfig, record: dict) -> None:
    """Refuses to resume from a checkpoint of other data unless ``resume_other_data``."""
    if cfg.ckpt_path is None:
        return
    ckpt = read_checkpoint(cfg.ckpt_path)
    check_same_data(ckpt, record, allow_other=bool(cfg.get("resume_other_data", False)))


def _deterministic_backend(cfg: DictConfig) -> None:
    """``deterministic=true`` on a GPU runs the plain-PyTorch op (``model.backend=reference``).

    The compiled op's CUDA backward accumulates with atomic adds, whose order varies run to
    run; the reference op under torch's deterministic algorithms does not (an op without a
    deterministic kernel raises instead). The price: the reference op's speed and memory
    (see benchmarks/RESULTS.md: some 10-35x slower per step). On the CPU the compiled op is
    deterministic already and stays.
    """
    if not cfg.get("deterministic", False) or cfg.model.backend != "compiled":
        return
    if on_gpu(str(cfg.trainer.accelerator)):
        log.warning(
            "deterministic=true on a GPU: model.backend=reference (the compiled op's CUDA "
            "backward is not bit-reproducible); expect a much slower run"
        )
        with open_dict(cfg):
            cfg.model.backend = "reference"


def multirun_device(job_num: int, device_count: int) -> list[int]:
    """The GPU of a multirun's worker process whose first job is ``job_num``: round robin over
    ``device_count`` GPUs.

    A launcher that runs n jobs side by side in n worker processes (``hydra/launcher=local``)
    hands them jobs 0 to n - 1 first, so the workers spread evenly over the GPUs; each keeps
    its GPU for its later jobs (:func:`_assign_multirun_device`).

    Returns:
        ``[job_num % device_count]``, a ``trainer.devices`` value (a list of one index).
    """
    if device_count < 1:
        raise ValueError(f"device_count must be >= 1, got {device_count}")
    return [job_num % device_count]


# The GPU this process trains its multirun jobs on, fixed by its first job. Taking the GPU by
# job number instead sent a worker's later jobs to the other GPUs too: each worker then made a
# CUDA context on every GPU (host memory and set-up time per context; measured on two H100s,
# 28 shapes, four workers: 100-290 MiB more host memory per worker after its first job, the
# jobs' initialisation 28-30 s summed against 19-21 s with one GPU).
_process_gpu: int | None = None


def _assign_multirun_device(cfg: DictConfig) -> None:
    """In a Hydra multirun on a machine with several GPUs, gives each single-GPU job its
    process's GPU (:func:`multirun_device` of the process's first job); a job that asks for
    several devices or names them keeps its setting, and nothing changes outside a multirun
    or on the CPU."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    global _process_gpu
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if not on_gpu(str(cfg.trainer.accelerator)) or cfg.trainer.devices not in (1, "1"):
        return
    count = torch.cuda.device_count()
    if count > 1:
        job = int(HydraConfig.get().job.num)
        if _process_gpu is None:
            _process_gpu = multirun_device(job, count)[0]
        with open_dict(cfg):
            cfg.trainer.devices = [_process_gpu]
        log.info("multirun job %d: GPU %d of %d (this process's)", job, _process_gpu, count)


def _resume_args(cfg: DictConfig) -> list[str]:
    """The arguments that select this run's data, for the resume hint after Ctrl-C."""
    return [f"data.path={cfg.data.path}"]


def build(cfg: DictConfig) -> Run:
    """Loads the shape, builds the op (if compiled), the network, module and trainer.

    Writes nothing: every refusal (bad data, model options, a checkpoint of other data)
    happens here or before.
    """
    t0 = time.perf_counter()
    dm: ShapeDataModule = _instantiate(cfg.data, "data")
    try:
        dm.load()
    except ShapeError as e:
        raise ShapeError(f"data.path: {e}") from None
    t1 = time.perf_counter()
    resolve_auto(cfg, dm.stats)
    _check_surface(dm, cfg)
    record = data_record(dm.path, dm.shape, dm.normalization)
    _check_resume(cfg, record)
    _deterministic_backend(cfg)
    _build_op(cfg.model.backend)
    surface = dm.surface
    init = PointInit(
        surface.points.numpy(), None if surface.normals is None else surface.normals.numpy()
    )
    net = _instantiate(cfg.model, "model", init=init)
    norm = dm.normalization
    module = SDFModule(
        net,
        model=_container(cfg.model),
        loss=_container(cfg.loss),
        optim=_container(cfg.optim),
        sampling=dm.sampling,
        validation=_container(cfg.validation),
        center=tuple(float(x) for x in norm.center),
        scale=norm.scale,
        seed=cfg.seed,
        # deterministic runs keep the eager step they were checked with
        cuda_graph=bool(cfg.get("cuda_graph", True)) and not cfg.get("deterministic", False),
    )
    module.set_surface(surface)
    # a group entry set to null (debug=fdr: no model_checkpoint) is left out
    callbacks = [
        _instantiate(c, "callbacks") for c in (cfg.get("callbacks") or {}).values() if c is not None
    ]
    callbacks.append(RunRecorder(record, _resume_args(cfg)))
    loggers = [_instantiate(c, "logger") for c in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = _instantiate(
        cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False
    )
    # under DDP: Lightning's SIGTERM check before every step, without a wait for the GPU
    check_sigterm_on_host(trainer)
    log.info(
        "training on %s: %d neural points, %s normals, %d steps",
        dm.path,
        net.num_points,
        "the file's" if dm.has_normals else "estimated",
        trainer.max_steps,
    )
    timing = {"load_seconds": t1 - t0, "init_seconds": time.perf_counter() - t1}
    return Run(dm, module, trainer, timing)


def fit(run: Run, ckpt_path: str | None = None) -> float:
    """Trains (resuming from ``ckpt_path`` if given); saves ``last.ckpt``; returns seconds.

    Adds to ``run.timing`` where the fit's time before the loop went: ``connect_seconds``
    (from the fit's start until the process group exists: under DDP the wait for the other
    ranks and NCCL's communicator) and ``prepare_seconds`` (from there to the first step: the
    device move, the DDP wrap, the optimiser).

    Ctrl-C saves ``last.ckpt``, prints how to resume or extract from it and exits with status
    1 (:class:`neusdf.callbacks.RunRecorder`).
    """
    t0 = time.perf_counter()
    # neusdf checkpoints hold plain Python containers besides tensors (the config): trusted
    # files of this project's own runs, loaded as full pickles
    run.trainer.fit(run.module, datamodule=run.data, ckpt_path=ckpt_path, weights_only=False)
    seconds = time.perf_counter() - t0
    m = run.module
    if m.setup_at is not None and m.loop_started_at is not None:
        run.timing["connect_seconds"] = m.setup_at - t0
        run.timing["prepare_seconds"] = m.loop_started_at - m.setup_at
    last = last_checkpoint_path(run.trainer)
    if last is not None and not run.trainer.fast_dev_run:
        # Lightning writes last.ckpt at validation and epoch ends; the step loader never ends
        # an epoch, so the final state is saved here (on rank 0; every rank joins the barrier).
        # fast_dev_run writes no checkpoints.
        run.trainer.save_checkpoint(last, weights_only=False)
    return seconds


def finalise(run: Run, cfg: DictConfig, fit_seconds: float) -> dict:
    """Extracts the mesh, scores it and writes ``mesh.<format>`` and ``metrics.json``.

    Call on rank 0 only. Returns the metrics (scores unless ``extract.score`` is false, plus
    ``timing``, ``memory`` and ``input``).
    """
    dm, trainer, x = run.data, run.trainer, cfg.extract
    mesh_path, metrics_path = _output_paths(cfg)
    # Lightning moves the module back to the CPU when fit ends; extract on the training device.
    device = trainer.strategy.root_device
    net = run.module.net.to(device).eval()
    verts, faces, stats = extract_mesh(
        net,
        x.resolution,
        dm.sampling.box,
        device,
        x.chunk,
        band=x.band,
        trim=trim_of(net) if x.trim else None,
    )
    verts = dm.normalization.from_unit(verts)
    t0 = time.perf_counter()
    save_mesh(mesh_path, verts, faces, overwrite=cfg.overwrite)
    t1 = time.perf_counter()
    metrics: dict = {}
    if x.score:
        metrics = evaluate(
            SurfaceSet(verts, faces),
            SurfaceSet.from_shape(dm.shape),
            num_query=x.num_query,
            num_ref=x.num_ref,
        )
    steps = trainer.global_step
    recorder = next((c for c in trainer.callbacks if isinstance(c, RunRecorder)), None)
    start = recorder.start_step if recorder is not None else 0
    metrics["timing"] = {
        **run.timing,
        "fit_seconds": fit_seconds,
        # the model's step count (restored steps included); the speed counts this run's only
        "steps": steps,
        "resumed_from_step": start,
        "steps_per_second": (steps - start) / fit_seconds if fit_seconds > 0 else float("nan"),
        # the training loop alone (fit_seconds also counts Lightning's set-up and, under DDP,
        # the launch of the other ranks) and the samples it drew per step over all ranks
        "loop_seconds": run.module.loop_seconds,
        "samples_per_step": dm.sampling.total * trainer.world_size,
        "extract_seconds": stats.seconds_total,
        "extract_resolution": int(x.resolution),
        "extract_evaluated_fraction": stats.evaluated / stats.total,
        "save_seconds": t1 - t0,
        "metrics_seconds": time.perf_counter() - t1,
    }
    metrics["input"] = {
        "path": dm.path,
        "has_normals": dm.has_normals,
        "spacing": dm.stats.spacing,
        "noise": dm.stats.noise,
    }
    # the process's resident host memory (MiB): what a multirun's worker process carries from
    # one job to the next
    metrics["memory"] = {
        "host_resident_mib_at_start": run.host_memory_mib_at_start,
        "host_resident_mib_at_end": resident_memory_mib(),
    }
    metrics["timing"]["finished_at"] = time.time()
    save_json(metrics_path, metrics, overwrite=cfg.overwrite)
    scores = {k: v for k, v in metrics.items() if isinstance(v, float)}
    if scores:
        print(format_table({Path(dm.path).name: scores}))
    t = metrics["timing"]
    print(
        f"load {t['load_seconds']:.1f} s, init {t['init_seconds']:.1f} s, train "
        f"{fit_seconds:.1f} s ({t['steps_per_second']:.1f} steps/s), extract "
        f"{stats.seconds_total:.1f} s at {x.resolution}^3, score {t['metrics_seconds']:.1f} s\n"
        f"mesh: {mesh_path}\nmetrics: {metrics_path}"
    )
    return metrics


def _clear_previous_run(cfg: DictConfig) -> None:
    """With ``overwrite=true``, removes the earlier run's files (:data:`RUN_FILES`) from the
    run directory, so that checkpoints and event files of two runs do not pile up.

    Kept when resuming from a checkpoint inside the run directory (the run continues there).
    """
    out_dir = Path(cfg.paths.output_dir)
    if not cfg.overwrite or not out_dir.is_dir():
        return
    if cfg.ckpt_path is not None and out_dir.resolve() in Path(cfg.ckpt_path).resolve().parents:
        return
    for name in RUN_FILES:
        p = out_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def train(
    cfg: DictConfig,
    on_accept: Callable[[], None] | None = None,
    startup: dict[str, float | int | None] | None = None,
) -> dict | None:
    """Trains, then (on rank 0) extracts the mesh and computes metrics.

    Sets the process-wide runtime first (:func:`neusdf.config.configure_runtime`). Checks
    everything it can before writing anything; then (``overwrite=true``) clears the earlier
    run from the run directory and calls ``on_accept`` (the command line writes its config
    and log files there).

    Args:
        cfg: the composed config (``configs/train.yaml``).
        on_accept: called once the run is accepted, before anything is written.
        startup: what the caller measured before this call (the command line: its process's
            id and start and when Hydra called the job's function, UNIX seconds, and the
            pipeline's import: ``process_id``, ``process_started_at``, ``job_function_at``,
            ``pipeline_import_seconds``), added to the timing in metrics.json; None values are
            left out.

    Returns:
        On rank 0, the metrics dict (reconstruction metrics against the input unless
        ``extract.score`` is false, plus ``timing``, ``memory`` and ``input``); None on other
        ranks.

    Raises:
        ShapeError, CheckpointError, FileExistsError, ValueError: bad input, with a message
        naming the option or file.
    """
    started, memory_at_start = time.time(), resident_memory_mib()
    configure_runtime(deterministic=bool(cfg.get("deterministic", False)))
    _assign_multirun_device(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_config(cfg)
    check_outputs(cfg)
    connect = start_early_connect(cfg)  # under torchrun: overlaps the data loading
    run = build(cfg)
    run.host_memory_mib_at_start = memory_at_start
    if connect is not None:
        run.timing["connect_wait_seconds"] = connect.wait()
    if is_main_process():
        _clear_previous_run(cfg)
    if on_accept is not None:
        on_accept()
    # wall-clock start and end (UNIX seconds): how jobs of a multirun overlapped
    run.timing["started_at"] = started
    run.timing.update({k: v for k, v in (startup or {}).items() if v is not None})
    fit_seconds = fit(run, cfg.ckpt_path)
    if run.trainer.global_rank != 0:
        return None
    return finalise(run, cfg, fit_seconds)
