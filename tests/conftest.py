"""Shared test helpers: run the CLIs from the shell as a user would, on the real Fashion-MNIST."""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import zygote

# Two pytest workers (-n 2) share the machine's cores: one torch thread per process (this one and every command it
# starts), or each process's thread pool fights the other's (two FAST runs at once on 2 cores: 42.5 s with torch's
# default threads, 22.2 s with one each).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The data cache the CLI uses (decompressed once from Debian's dataset-fashion-mnist by `make data`).
DATA_DIR = Path(os.environ.get("VAELAB_DATA_DIR", REPO / "data"))
# Debian's dataset-fashion-mnist, the source of that cache: tests that read the data name it, so that on a fresh clone
# whichever test comes first fills the cache (no test may assume another ran before it).
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

# A few batches of real data: enough to train visibly, small enough for a test. Three epochs, not the default ten
# (validation and pictures in the last only, the default's every 5 epochs and the last). Validation
# and test batches of 250: 1,000 images each (the IWAE bound of the test stage is most of their cost).
FAST = [
    "epochs=3",
    "trainer.limit_train_batches=20",
    "trainer.limit_val_batches=4",
    "trainer.limit_test_batches=4",
    "trainer.log_every_n_steps=5",
    "batch_size=64",
    "data.eval_batch_size=250",
    "~callbacks.progress_bar",
]


def default_signals() -> None:
    """In the child: Ctrl-C as in a terminal. A shell without job control starts background jobs with SIGINT
    ignored, and the child would inherit that (pytest started with `&` from a script)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(
    *args: str,
    tool: str = "vaelab-train",
    check: bool = True,
    timeout: float = 300,
    env: dict | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run a console script and return the finished process; on failure show what it printed. A fork of a zygote
    that has done torch's imports stands in for the fresh process where it can (tests/zygote.py says when)."""
    base_env = {**os.environ, "VAELAB_DATA_DIR": str(DATA_DIR), "PYTHONUNBUFFERED": "1"}
    full_env = {**base_env, **(env or {})}
    if zygote.serves(tool, full_env, base_env):
        proc = zygote.run(BIN / tool, list(args), full_env, cwd or REPO, timeout, base_env)
    else:
        proc = subprocess.run(
            [str(BIN / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            cwd=cwd or REPO,
            stdin=subprocess.DEVNULL,
            preexec_fn=default_signals,
        )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{tool} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def train_run(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """vaelab-train into run_dir with the FAST settings (later overrides win)."""
    return run_cli(*FAST, f"hydra.run.dir={run_dir}", *overrides, check=check)


def read_metrics(run_dir: Path) -> dict[str, float]:
    """The figures of a run's metrics.json (without its labels: likelihood, binarize, figures)."""
    return {k: v for k, v in json.loads((run_dir / "metrics.json").read_text()).items() if not isinstance(v, str)}


def event_accumulator(run_dir: Path):
    """TensorBoard's own reader over a run's event files (all of them, as TensorBoard shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


# vaelab.pictures.base.TENSORBOARD_PREFIX, spelled out: the event files' tags are part of vaelab's interface.
PICTURE_PREFIX = "visuals/"


def image_tags(acc) -> set[str]:
    """A run's picture tags as vaelab names them (TensorBoard holds each under PICTURE_PREFIX, after the curves)."""
    tags = acc.Tags()["images"]
    assert all(tag.startswith(PICTURE_PREFIX) for tag in tags), tags
    return {tag.removeprefix(PICTURE_PREFIX) for tag in tags}


def logged_images(acc, tag: str):
    """The logged images of one picture tag."""
    return acc.Images(PICTURE_PREFIX + tag)


def made_once(tmp_path_factory, name: str, make) -> Path:
    """`<shared>/<name>/run`, made by `make(run_dir)` once for the whole test session: pytest-xdist gives each worker
    a session of its own, so a session fixture would otherwise train the same run once per worker. The first worker
    makes it under a lock; the others wait for it and read it (these runs are read-only to the tests)."""
    import fcntl
    import shutil

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the folder all workers share
    folder = root / f"made-once-{name}"
    with open(root / f"made-once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            make(folder / "run")
            (folder / ".made").touch()
    return folder / "run"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One short real training run shared by the read-only tests."""
    return made_once(
        tmp_path_factory, "trained", lambda run_dir: train_run(run_dir, "epochs=2", "latent_dim=16", "noise_factor=0.3")
    )


# The short conditional run the conditional tests share: one epoch of 300 batches of 128 of an mlp VAE with a 2-D
# latent space (a small latent space leans on the label), 20 samples per class in samples/by_class.
CONDITIONAL_RUN = [
    "model=mlp",
    "latent_dim=2",
    "model.conditional=true",
    "lr=3e-3",
    "batch_size=128",
    "trainer.limit_train_batches=300",
    "epochs=1",
    "callbacks.samples.ncols=20",
]


@pytest.fixture(scope="session")
def conditional_run(tmp_path_factory) -> Path:
    """One short real conditional training run (model.conditional=true) shared by the read-only tests."""
    return made_once(tmp_path_factory, "conditional", lambda run_dir: train_run(run_dir, *CONDITIONAL_RUN))


@pytest.fixture
def compose(tmp_path):
    """Compose conf/train.yaml as vaelab-train would, with overrides, paths pointed into tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import vaelab.runs.settings  # noqa: F401  registers the schemas and resolvers, as vaelab-train does

    def _compose(overrides: list[str]):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = hydra_compose(
                "train",
                overrides=[f"paths.root_dir={tmp_path}", f"paths.data_dir={DATA_DIR}", *overrides],
                return_hydra_config=True,
            )
            HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} resolve outside a real run
            with open_dict(cfg):
                cfg.paths.output_dir = str(tmp_path / "run")
                del cfg["hydra"]
        return cfg

    return _compose


def one_line(proc: subprocess.CompletedProcess, start: str, code: int | None = None) -> str:
    """The battery's rule: the exit status, exactly one line on stderr starting with `start`, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(start), lines[0]
    assert proc.returncode == (code if code is not None else 1), (proc.returncode, lines[0])
    return lines[0]


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file under the folders, with its bytes: compared before and after, nothing may change."""
    return {str(p): p.read_bytes() for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file()}


def pause_at(marker: Path, stage: str = "train", epoch: int = 1, batch: int = 5) -> list[str]:
    """Overrides that hold a run at a batch (tests/pausing.py; run with PAUSING_ENV) and write `marker` there."""
    return [
        "+callbacks.pause._target_=pausing.Pause",
        f"+callbacks.pause.marker={marker}",
        f"+callbacks.pause.stage={stage}",
        f"+callbacks.pause.epoch={epoch}",
        f"+callbacks.pause.batch={batch}",
    ]


# tests/ added to the caller's PYTHONPATH (which may point at a checkout's src/ other than the installed one)
PAUSING_ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)}


def start(*args: str, tool: str = "vaelab-train", log: Path, env: dict | None = None) -> subprocess.Popen:
    """A command in the background, its output into files beside `log` (a full pipe never blocks it)."""
    full_env = {**os.environ, "VAELAB_DATA_DIR": str(DATA_DIR), "PYTHONUNBUFFERED": "1", **(env or {})}
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(BIN / tool), *args],
        stdout=open(f"{log}.out", "w"),
        stderr=open(f"{log}.err", "w"),
        stdin=subprocess.DEVNULL,
        env=full_env,
        cwd=REPO,
        preexec_fn=default_signals,
    )


def finished(proc: subprocess.Popen, log: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text())


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the command ended ({proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def dense_vae(latent_dim: int = 3, image_shape=(1, 4, 4), lr: float = 1e-2, **kwargs):
    """A small dense VAE built in-process (no config): the Lightning module, for unit tests of training and its
    guards; its `.vae` is the plain VAE (vaelab.model.vae.VAE) for tests of the model alone."""
    from vaelab.training.module import VAEModule

    net = {"latent_dim": latent_dim, "image_shape": list(image_shape)}
    return VAEModule(
        encoder={"_target_": "vaelab.model.networks.DenseEncoder", **net},
        decoder={"_target_": "vaelab.model.networks.DenseDecoder", **net},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": lr},
        latent_dim=latent_dim,
        **kwargs,
    )


def idx_bytes(array, magic: int) -> bytes:
    """A uint8 tensor as an IDX file's bytes (the format of MNIST and its family): magic, sizes, data."""
    import struct

    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.numpy().tobytes()


def run_with_file_limit(kib: int, *args: str, tool: str = "vaelab-train") -> subprocess.CompletedProcess:
    """A console script under `ulimit -f` (Python ignores SIGXFSZ, so a write past the limit fails with EFBIG): a full
    disk in miniature."""
    return subprocess.run(
        ["bash", "-c", f'ulimit -f {kib} && exec "$0" "$@"', str(BIN / tool), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "VAELAB_DATA_DIR": str(DATA_DIR)},
    )


SHAPE_COLOURS = {"blue_triangles": (50, 80, 230), "green_squares": (40, 200, 60), "red_discs": (220, 40, 40)}


def draw_shapes(root: Path, per_class: int = 70, size: int = 32, seed: int = 0) -> Path:
    """A folder of colour images drawn with PIL: one subfolder per class (red discs, green squares, blue
    triangles), each shape at a random place and size on a random dark background."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for name, colour in SHAPE_COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 40, 3)))
            draw = ImageDraw.Draw(image)
            r = int(rng.integers(size // 5, size // 3))
            x, y = (int(v) for v in rng.integers(r, size - r, 2))
            if name == "red_discs":
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
            elif name == "green_squares":
                draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
            else:
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
            image.save(root / name / f"{i:03d}.png")
    return root


def rgb_data(folder: Path) -> list[str]:
    """The settings of the coloured shapes (32x32 RGB) for vaelab-train, -eval and -generate."""
    return ["data=image_folder", f"data.path={folder}", "data.channels=3", "data.image_size=32"]


@pytest.fixture(scope="session")
def rgb_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, image folder): model=conv with the discretized logistic on 210 coloured shapes, every picture on."""

    def make(run_dir: Path) -> None:
        folder = draw_shapes(run_dir.parent / "shapes")
        train_run(
            run_dir,
            *rgb_data(folder),
            "model=conv",
            "model.likelihood=discretized_logistic",
            "latent_dim=8",
            "epochs=2",
            "lr=3e-3",
            "batch_size=32",
            "trainer.check_val_every_n_epoch=1",  # validation and pictures at both epochs
        )

    run_dir = made_once(tmp_path_factory, "rgb", make)
    return run_dir, run_dir.parent / "shapes"


# --- the two tiers ---------------------------------------------------------------------------------------------
# `make check` runs the in-process tests (`-m "not shell and not slow"`), `make test` all of them. A test is a shell
# test when it starts a process (a console script, a subprocess), directly, through a fixture it uses, or through a
# function of its module or of this file; it is marked here from the source, so no one has to remember the marker.
# A fixture asked for by name while the test runs (request.getfixturevalue) is unknown here: such a test counts as one.
# (A multiprocessing pool running a function of the test is in-process: quick, and no command is started.)
STARTS_A_PROCESS = re.compile(
    r"\bsubprocess\.(?:run|Popen|call|check_call|check_output)\(|(?<![\w.])Popen\(|\bos\.(?:system|fork|exec\w*|spawn\w*)\("
    r"|\.getfixturevalue\("
)


def _starts_a_process(source: str, starters: frozenset[str]) -> bool:
    calls = starters and re.search(r"(?<![\w.])(?:" + "|".join(map(re.escape, sorted(starters))) + r")\(", source)
    return bool(STARTS_A_PROCESS.search(source) or calls)


@functools.cache
def process_starters(module) -> frozenset[str]:
    """The names of `module`'s own functions that start a process, directly or through one another (or through one
    of this file's)."""
    own = {
        name: inspect.getsource(value)
        for name, value in vars(module).items()
        if inspect.isfunction(value) and value.__module__ == module.__name__
    }
    starters = frozenset() if module is sys.modules[__name__] else process_starters(sys.modules[__name__])
    while True:
        more = {name for name, source in own.items() if name not in starters and _starts_a_process(source, starters)}
        if not more:
            return starters
        starters |= more


@functools.cache  # one answer per function: parametrized tests and shared fixtures are read once
def starts_a_process(function) -> bool:
    return _starts_a_process(inspect.getsource(function), process_starters(inspect.getmodule(function)))


# The modules that took longest (`make test` prints --durations=15; the sum per module, measured 2026-12-03).
LONGEST = (
    "runs/test_rundir.py",
    "commands/test_battery.py",
    "runs/test_sweep.py",
    "pictures/test_callbacks.py",
    "commands/test_train.py",
    "commands/test_user_configs.py",
    "runs/test_checkpoints.py",
    "commands/test_evaluate.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    tests = Path(__file__).parent
    for item in items:
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        ours = [
            f for f in [item.function, *fixtures] if Path(inspect.getsourcefile(f) or "/").is_relative_to(tests)
        ]  # not pytest's
        if any(starts_a_process(f) for f in ours):
            item.add_marker(pytest.mark.shell)
    # The longest modules first: pytest-xdist (--dist loadscope) hands whole modules to its workers in collection
    # order, so a long module that comes last keeps one worker busy alone while the other waits (the suite's end).
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.relative_to(tests).as_posix(), len(LONGEST)))


def pytest_sessionfinish(session, exitstatus) -> None:
    zygote.stop()  # this worker's zygote, if it started one
