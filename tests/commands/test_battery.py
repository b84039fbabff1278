"""The adversarial battery, from the shell, as a hostile user would try it: bad settings of every command, damaged
data, unwritable and full disks, run directories written over, resumes that must change nothing, a GPU that is
not there, Ctrl-C in the first second. Every case asserts the exit status, exactly one line on stderr naming the
bad value and a fix, no traceback, and that the files written before are byte-identical afterwards.

(Kills and resumes: test_rundir. Crafted checkpoints: test_checkpoints. Sweeps stopped by signals: test_sweep.)
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, DATA_DIR, FAST, finished, one_line, run_cli, run_with_file_limit, snapshot, start, train_run

CKPT = "outputs/<date>/<time>/checkpoints/last.ckpt"

# (tool, override, the line after "<tool>: error: "): nothing may be created, not even the run directory.
SETTINGS = [
    ("vaelab-train", "latent_dim=0", "latent_dim=0 is not allowed: latent_dim must be a positive integer, e.g. latent_dim=16"),
    (
        "vaelab-train",
        "latent_dim=abc",
        "latent_dim=abc is not allowed: latent_dim must be a positive integer, e.g. latent_dim=16",
    ),
    ("vaelab-train", "epochs=-1", "epochs=-1 is not allowed: epochs must be a positive integer, e.g. epochs=10"),
    (
        "vaelab-train",
        "batch_size=2.5",
        "batch_size=2.5 is not allowed: batch_size must be a positive integer, e.g. batch_size=128",
    ),
    (
        "vaelab-train",
        "noise_factor=1.5",
        "noise_factor=1.5 is not allowed: noise_factor must be a number in [0, 1], e.g. noise_factor=0.1",
    ),
    ("vaelab-train", "lr=0", "lr=0 is not allowed: lr must be a number > 0, e.g. lr=1e-3"),
    ("vaelab-train", "beta=-1", "beta=-1 is not allowed: beta must be a number >= 0, e.g. beta=1.0"),
    ("vaelab-train", "seed=abc", "seed=abc is not allowed: seed must be an integer, e.g. seed=42"),
    ("vaelab-train", "threads=-1", "threads=-1 is not allowed: threads must be a positive integer or null, e.g. threads=null"),
    ("vaelab-train", "data.val_size=0", "data.val_size=0 is not allowed: data.val_size must be an integer between 1 and 59999"),
    (
        "vaelab-train",
        "data.eval_batch_size=0",
        "data.eval_batch_size=0 is not allowed: data.eval_batch_size must be a positive integer",
    ),
    (
        "vaelab-train",
        "trainer.max_epochs=0",
        "trainer.max_epochs=0 is not allowed: trainer.max_epochs must be a positive integer",
    ),
    ("vaelab-train", "callbacks.samples.num_samples=0", "callbacks.samples.num_samples=0 is not allowed"),
    (
        "vaelab-train",
        "callbacks.interpolation.method=cubic",
        "callbacks.interpolation.method='cubic' is not allowed: callbacks.interpolation.method must be one of linear, spherical",
    ),
    ("vaelab-train", "latent_dimm=3", "there is no setting latent_dimm: did you mean latent_dim?"),
    ("vaelab-train", "model=foo", "model=foo is not a choice of model: choose one of conv, dense, mlp"),
    ("vaelab-train", "latent_dim=[1", "cannot parse the override 'latent_dim=[1'"),
    ("vaelab-train", "trainer.accelerator=tpu", "trainer.accelerator='tpu' is not allowed"),
    (
        "vaelab-train",
        "model.likelihood=poisson",
        "model.likelihood='poisson' is not allowed: model.likelihood must be one of bernoulli, continuous_bernoulli, "
        "discretized_logistic, gaussian, e.g. model.likelihood=bernoulli",
    ),
    (
        "vaelab-train",
        "data.binarize=sometimes",
        "data.binarize='sometimes' is not allowed: data.binarize must be one of none, dynamic, static, e.g. data.binarize=none",
    ),
    (
        "vaelab-train",
        "model.free_bits=-1",
        "model.free_bits=-1 is not allowed: model.free_bits must be a number >= 0, e.g. model.free_bits=0.5",
    ),
    (
        "vaelab-train",
        "model.kl_warmup_epochs=-2",
        "model.kl_warmup_epochs=-2 is not allowed: model.kl_warmup_epochs must be an integer >= 0 (0: no warm-up), "
        "e.g. model.kl_warmup_epochs=100",
    ),
    (
        "vaelab-train",
        "model.objective=iwae model.num_samples=0",  # two settings (split on the space)
        "model.num_samples=0 is not allowed: model.num_samples must be a positive integer, e.g. model.num_samples=5",
    ),
    ("vaelab-eval", "", f"ckpt_path is required, e.g. ckpt_path={CKPT}"),
    (
        "vaelab-eval",
        "num_importance_samples=0",
        "num_importance_samples=0 is not allowed: num_importance_samples must be a positive integer or null",
    ),
    (
        "vaelab-eval",
        "noise_levels=[-1]",
        "noise_levels=[-1] is not allowed: noise_levels must be a non-empty list of noise standard deviations >= 0",
    ),
    ("vaelab-eval", "device=tpu", "device='tpu' is not allowed: device must be auto, cpu, cuda, cuda:<index> or mps"),
    ("vaelab-eval", "num_images=0", "num_images=0 is not allowed"),
    ("vaelab-eval", "pairs_per_pass=abc", "pairs_per_pass=abc is not allowed: pairs_per_pass must be a positive integer"),
    ("vaelab-generate", "", f"ckpt_path is required, e.g. ckpt_path={CKPT}"),
    ("vaelab-generate", "num_samples=0", "num_samples=0 is not allowed: num_samples must be a positive integer"),
    ("vaelab-generate", "temperature=0", "temperature=0 is not allowed: temperature must be a number > 0"),
    ("vaelab-generate", "num_steps=1", "num_steps=1 is not allowed: num_steps must be an integer >= 2"),
    ("vaelab-generate", "num_pairs=0", "num_pairs=0 is not allowed"),
    ("vaelab-generate", "interpolate=perhaps", "interpolate=perhaps is not allowed: interpolate must be true or false"),
    # numbers that are not finite, where a finite one is meant
    ("vaelab-train", "lr=nan", "lr=nan is not allowed: lr must be a number > 0, e.g. lr=1e-3"),
    ("vaelab-train", "noise_factor=inf", "noise_factor=inf is not allowed: noise_factor must be a number in [0, 1]"),
    ("vaelab-train", "model.free_bits=inf", "model.free_bits=inf is not allowed: model.free_bits must be a number >= 0"),
    ("vaelab-train", "callbacks.traversals.range_std=nan", "callbacks.traversals.range_std=nan is not allowed"),
    ("vaelab-eval", "active_unit_threshold=inf", "active_unit_threshold=inf is not allowed: active_unit_threshold must be"),
    ("vaelab-eval", "noise_levels=[a]", "noise_levels=[a] is not allowed: noise_levels must be a non-empty list"),
    # settings added with the likelihoods, the image folders and the pictures
    ("vaelab-train", "model.likelihood=poisson", "model.likelihood='poisson' is not allowed: model.likelihood must be one of"),
    ("vaelab-train", "model.kl_warmup_epochs=1.5", "model.kl_warmup_epochs=1.5 is not allowed: model.kl_warmup_epochs must be"),
    ("vaelab-train", "data.binarize=yes", "data.binarize='yes' is not allowed: data.binarize must be one of none, dynamic"),
    ("vaelab-train", "batch_size=-5", "batch_size=-5 is not allowed: batch_size must be a positive integer"),
    ("vaelab-train", "callbacks.traversals.kl_images=abc", "callbacks.traversals.kl_images='abc' is not allowed"),
    ("vaelab-train", "data=image_folder", "data.path is required, e.g. data.path=path/to/images"),
    # a YAML interpolation typed where a value belongs
    ("vaelab-train", "latent_dim=${oc.env:HOME}", "latent_dim cannot be read (While dereferencing interpolation"),
    # typed settings without a range: the type error names the fix too
    ("vaelab-train", "overwrite=maybe", "overwrite=maybe is not allowed: overwrite must be true or false, e.g. overwrite=false"),
    ("vaelab-eval", "allow_networks=abc", "allow_networks=abc is not allowed: allow_networks must be a list of dotted"),
    ("vaelab-generate", "allow_networks=['']", "allow_networks=[''] is not allowed: allow_networks must be a list of dotted"),
    # an empty path would mean the working directory: nothing may be written there
    ("vaelab-train", "hydra.run.dir=", "hydra.run.dir='' is empty; name a new directory"),
    ("vaelab-eval", "hydra.run.dir=", "hydra.run.dir='' is empty; name a new directory"),
    ("vaelab-train", "data.data_dir=", "data.data_dir='' is not allowed: data.data_dir must be a non-empty string"),
    ("vaelab-train", "resume_from=", "resume_from= is no longer a setting: to continue a run in place, run vaelab-resume"),
    ("vaelab-train", "ckpt_path=", "ckpt_path='' is not allowed: ckpt_path must be a path or null"),
    ("vaelab-train", "callbacks.model_checkpoint.dirpath=", "callbacks.model_checkpoint.dirpath='' is not allowed"),
    ("vaelab-train", "logger=csv logger.csv.save_dir=", "logger.csv.save_dir='' is not allowed: logger.csv.save_dir must be"),
]


@pytest.mark.parametrize("tool,override,says", SETTINGS, ids=[f"{t}:{o or 'no ckpt_path'}" for t, o, _ in SETTINGS])
def test_bad_settings_stop_before_anything_is_written(tmp_path, tool, override, says):
    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    ckpt = [] if tool == "vaelab-train" or not override else ["ckpt_path=x.ckpt"]
    proc = run_cli(
        f"hydra.run.dir={run_dir}",
        *ckpt,
        *override.split(),
        tool=tool,
        check=False,
        env={"VAELAB_DATA_DIR": str(data_dir)},
        cwd=tmp_path,  # an empty path must not mean this directory: nothing may appear in it
    )
    assert one_line(proc, f"{tool}: error: ").startswith(f"{tool}: error: {says}")
    assert list(tmp_path.iterdir()) == []


CHECKPOINT_PATHS = [
    (tool, where)
    for tool in ("vaelab-train", "vaelab-eval", "vaelab-generate")
    for where in ("missing dir/last.ckpt", "a run dir")
]


@pytest.mark.parametrize("tool,where", CHECKPOINT_PATHS)
def test_a_checkpoint_path_that_is_not_a_file_stops_before_anything_is_written(tmp_path, tool, where):
    """Checked with the settings (no torch import, no run directory): a path with a space, and a run directory
    where its checkpoint was meant."""
    (tmp_path / "a run dir" / "checkpoints").mkdir(parents=True)
    (tmp_path / "a run dir" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    before = snapshot(tmp_path)
    proc = run_cli(f"ckpt_path={tmp_path / where}", f"hydra.run.dir={tmp_path / 'out'}", tool=tool, check=False)
    if where == "a run dir":
        says = f"ckpt_path={tmp_path / where}: {tmp_path / where} is a directory, not a .ckpt file; did you mean "
        assert one_line(proc, f"{tool}: error: {says}").endswith(f"ckpt_path={tmp_path / where}/checkpoints/last.ckpt?")
    else:
        one_line(proc, f"{tool}: error: checkpoint {tmp_path / where} not found; pass ckpt_path=<run dir>/checkpoints/")
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_the_settings_checks_take_a_fraction_of_a_second(tmp_path):
    started = time.perf_counter()
    one_line(run_cli(f"hydra.run.dir={tmp_path / 'run'}", "latent_dim=0", check=False), "vaelab-train: error: latent_dim=0")
    assert time.perf_counter() - started < 5  # no torch import, no data (about 0.5 s here; benchmarks/startup_checks.py)


@pytest.mark.skipif(
    Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1",
    reason="with overcommit always on, a huge allocation succeeds and the OOM killer ends the process instead",
)
def test_a_size_too_large_for_memory_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(f"hydra.run.dir={run_dir}", "latent_dim=1000000000", check=False, cwd=tmp_path)
    line = one_line(proc, "vaelab-train: error: out of memory (")
    assert "(the largest number given: latent_dim=1000000000); make it smaller (latent_dim, batch_size" in line
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize(
    "tool,args",
    [
        ("vaelab-train", ["trainer=gpu"]),
        ("vaelab-train", ["trainer=ddp", "trainer.accelerator=gpu"]),
        ("vaelab-eval", ["ckpt_path=x.ckpt", "device=cuda"]),
        ("vaelab-generate", ["ckpt_path=x.ckpt", "device=cuda:1"]),
    ],
)
def test_a_gpu_asked_for_on_a_machine_without_one(tmp_path, tool, args):
    proc = run_cli(f"hydra.run.dir={tmp_path / 'run'}", *args, tool=tool, check=False)
    line = one_line(proc, f"{tool}: error: ")
    assert "this machine has no GPU that torch can use" in line and ("trainer=cpu" in line or "device=cpu" in line)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- data -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_files(trained_run) -> Path:
    """The real decompressed IDX files (the session's trained run made sure the data cache exists)."""
    from vaelab.data.mnist import locate

    return locate(DATA_DIR, "FashionMNIST", None, download=False)


def damaged_copy(tmp_path: Path, raw: Path, name: str, damage) -> Path:
    """A data_dir whose FashionMNIST/raw holds the real files (links), one of them damaged."""
    folder = tmp_path / "data" / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for path in raw.iterdir():
        (folder / path.name).symlink_to(path)
    (folder / name).unlink()
    damage(folder / name, (raw / name).read_bytes())
    return tmp_path / "data"


DATA_FAULTS = {
    "truncated": (
        lambda p, raw: p.write_bytes(raw[:-1]),
        "t10k-labels-idx1-ubyte: file is 10007 bytes, expected 10008 (truncated or corrupted); delete it",
    ),
    "wrong magic": (
        lambda p, raw: p.write_bytes((2051).to_bytes(4, "big") + raw[4:]),
        "t10k-labels-idx1-ubyte: IDX magic number is 2051, expected 2049",
    ),
    "empty": (lambda p, raw: p.write_bytes(b""), "t10k-labels-idx1-ubyte: file is 0 bytes, too short for an IDX header"),
    "a directory": (lambda p, raw: p.mkdir(), "t10k-labels-idx1-ubyte: cannot be read (Is a directory); delete it and run again"),
}


@pytest.mark.parametrize("fault", list(DATA_FAULTS))
def test_a_damaged_data_file_is_named_with_the_fix(tmp_path, raw_files, fault):
    damage, says = DATA_FAULTS[fault]
    data_dir = damaged_copy(tmp_path, raw_files, "t10k-labels-idx1-ubyte", damage)
    before = snapshot(data_dir)
    proc = train_run(tmp_path / "run", f"data.data_dir={data_dir}", check=False)
    line = one_line(proc, f"vaelab-train: error: {data_dir}/FashionMNIST/raw/")
    assert says in line
    assert snapshot(data_dir) == before and not (tmp_path / "run" / "checkpoints").exists()


def debian_copy(tmp_path: Path, damage) -> Path:
    """A stand-in for /usr/share/datasets/fashion-mnist: the real .gz files, one of them damaged."""
    system = tmp_path / "debian"
    system.mkdir()
    for path in Path("/usr/share/datasets/fashion-mnist").glob("*.gz"):
        shutil.copy(path, system / path.name)
    target = system / "t10k-labels-idx1-ubyte.gz"
    damage(target)
    return system


@pytest.mark.parametrize(
    "damage,says",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-20]), "cannot be decompressed"),
        (lambda p: p.write_bytes(b"not gzip at all"), "cannot be decompressed"),
        (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 20)), "IDX header says shape"),
    ],
)
def test_a_damaged_debian_archive_is_named_and_nothing_half_written_is_cached(tmp_path, damage, says):
    system = debian_copy(tmp_path, damage)
    cache = tmp_path / "cache"
    proc = train_run(tmp_path / "run", f"data.data_dir={cache}", f"data.system_dir={system}", check=False)
    line = one_line(proc, "vaelab-train: error: ")
    assert says in line and ("t10k-labels-idx1-ubyte" in line)
    assert "apt-get install --reinstall dataset-fashion-mnist" in line or "delete it and run again" in line
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob(".*.tmp"))


def test_an_unwritable_data_cache_names_the_setting_that_moves_it(tmp_path):
    proc = train_run(tmp_path / "run", "data.data_dir=/proc/vaelab-cache", check=False)
    line = one_line(proc, "vaelab-train: error: cannot write the data cache /proc/vaelab-cache")
    assert "data.data_dir=<dir> (or the environment variable VAELAB_DATA_DIR)" in line and "hydra.run.dir" not in line


def test_missing_data_names_three_ways(tmp_path):
    proc = train_run(tmp_path / "run", f"data.data_dir={tmp_path / 'nowhere'}", "data.system_dir=null", check=False)
    line = one_line(proc, f"vaelab-train: error: FashionMNIST not found in {tmp_path}/nowhere/FashionMNIST/raw. ")
    assert "(1)" in line and "data.download=true" in line


def test_a_download_that_fails_is_one_line(tmp_path):
    # A proxy on a closed port: the download fails at once, and nothing can be fetched even where the internet is.
    proxy = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    proc = run_cli(
        *FAST,
        f"hydra.run.dir={tmp_path / 'run'}",
        "data=mnist",
        f"data.data_dir={tmp_path / 'mnist'}",
        "data.download=true",
        check=False,
        env={**proxy, "no_proxy": "", "NO_PROXY": ""},
    )
    line = one_line(proc, "vaelab-train: error: downloading MNIST with torchvision failed")
    assert f"put the four IDX files in {tmp_path}/mnist/MNIST/raw" in line


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_vaelab_eval_stopped_by_a_signal_says_so(tmp_path, trained_run, signum):
    """Outside training (no Lightning to catch it) SIGTERM ended vaelab-eval without a word."""
    run_dir = tmp_path / "eval"
    before = snapshot(trained_run)
    args = [f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={run_dir}", "num_importance_samples=5000"]
    proc = start(*args, tool="vaelab-eval", log=tmp_path / "log")
    deadline = time.monotonic() + 120
    while "as the checkpoint's model was trained" not in (
        (run_dir / "eval.log").read_text() if (run_dir / "eval.log").exists() else ""
    ):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signum)
    name = signal.Signals(signum).name
    line = one_line(
        finished(proc, tmp_path / "log"), f"vaelab-eval: interrupted: stopped by {name}; eval.json is written only", 128 + signum
    )
    assert line.endswith("run it again for the results") and f"stopped by {name}" in (run_dir / "eval.log").read_text()
    assert not (run_dir / "eval.json").exists() and snapshot(trained_run) == before


# --- output directories and disks -----------------------------------------------------------------------------


def test_a_file_named_outputs_in_the_working_directory(tmp_path):
    (tmp_path / "outputs").write_text("keep me")
    proc = run_cli("latent_dim=4", check=False, cwd=tmp_path, env={"VAELAB_ROOT": str(tmp_path)})
    line = one_line(proc, f"vaelab-train: error: cannot write the output directory {tmp_path}/outputs/")
    assert "a file is in the way" in line and line.endswith("hydra.run.dir=<dir> or paths.log_dir=<dir>")
    assert (tmp_path / "outputs").read_text() == "keep me"


@pytest.mark.parametrize(
    "where,says", [("file/run", "a file is in the way"), ("/proc/vaelab-test/run", "No such file or directory")]
)
def test_an_unwritable_output_dir(tmp_path, where, says):
    # Tests run as root, where chmod stops nothing: a file where a directory should be, and /proc (which refuses new
    # entries to everyone) stand in for a read-only location.
    (tmp_path / "file").write_text("keep me")
    run_dir = tmp_path / where if not where.startswith("/") else Path(where)
    proc = run_cli(f"hydra.run.dir={run_dir}", check=False)
    line = one_line(proc, f"vaelab-train: error: cannot write the output directory {run_dir}: {says}")
    assert line.endswith("choose a writable one with hydra.run.dir=<dir> or paths.log_dir=<dir>")
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.mark.parametrize(
    "setting,where,says",
    [
        ("logger.tensorboard.save_dir", "/proc/vaelab-test", "No such file or directory"),
        ("callbacks.model_checkpoint.dirpath", "file/checkpoints", "a file is in the way (Not a directory)"),
        ("callbacks.samples.image_dir", "/proc/vaelab-test/images", "No such file or directory"),  # its parent is named
    ],
)
def test_a_folder_a_setting_names_that_cannot_be_made_names_that_setting(tmp_path, setting, where, says):
    (tmp_path / "file").write_text("keep me")
    folder = where if where.startswith("/") else str(tmp_path / where)
    proc = train_run(tmp_path / "run", "epochs=1", "trainer.limit_train_batches=2", f"{setting}={folder}", check=False)
    line = one_line(proc, f"vaelab-train: error: cannot write {folder.removesuffix('/images')}: {says}. Everything written")
    assert f"choose another place with {setting}=<dir>" in line
    assert (tmp_path / "file").read_text() == "keep me"


def test_a_directory_where_a_result_file_goes(tmp_path, trained_run):
    """metrics.json is written last, over a directory someone put there: one line, the directory kept."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "metrics.json").unlink()
    (run_dir / "metrics.json").mkdir()
    (run_dir / "metrics.json" / "keep").write_text("mine")
    proc = run_cli(str(run_dir), "epochs=3", "trainer.limit_train_batches=2", tool="vaelab-resume", check=False)
    line = one_line(proc, f"vaelab-resume: error: cannot write {run_dir}/metrics.json: a directory is in the way (Is a")
    assert line.endswith(
        f"move it away, or choose another place with hydra.run.dir=<dir>; then continue with: vaelab-resume {run_dir}"
    )
    assert (run_dir / "metrics.json" / "keep").read_text() == "mine"


def test_a_full_disk_while_event_files_are_written(tmp_path):
    """A file-size limit (ulimit -f; Python ignores SIGXFSZ, so writes fail with EFBIG) below the pictures' size."""
    run_dir = tmp_path / "run"
    proc = run_with_file_limit(200, *FAST, "epochs=1", f"hydra.run.dir={run_dir}")
    line = one_line(proc, f"vaelab-train: error: cannot write {run_dir}/tensorboard")
    assert "File too large. Everything written before is kept" in line and "hydra.run.dir=<dir>" in line
    assert "File too large" in (run_dir / "train.log").read_text()


# --- run directories are never written over ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "tool,args", [("vaelab-train", FAST), ("vaelab-eval", ["ckpt_path=X"]), ("vaelab-generate", ["ckpt_path=X"])]
)
def test_a_run_directory_is_not_written_over(tmp_path, trained_run, tool, args):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = snapshot(run_dir)
    args = [a.replace("X", str(run_dir / "checkpoints" / "last.ckpt")) for a in args]
    proc = run_cli(*args, f"hydra.run.dir={run_dir}", tool=tool, check=False)
    line = one_line(proc, f"{tool}: error: hydra.run.dir={run_dir} already holds a run (")
    assert f"(to continue it: vaelab-resume {run_dir})" in line and "overwrite=true" in line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("tool", ["vaelab-eval", "vaelab-generate", "vaelab-train"])
def test_overwrite_true_never_removes_the_checkpoint_it_reads(tmp_path, trained_run, tool):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = snapshot(run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_cli(f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}", "overwrite=true", tool=tool, check=False)
    line = one_line(proc, f"{tool}: error: overwrite=true would move away ckpt_path={ckpt}, which is in hydra.run.dir=")
    assert line.endswith("write the results to another directory (hydra.run.dir=<new dir>)")
    assert snapshot(run_dir) == before


def test_overwrite_true_replaces_the_old_run(tmp_path, trained_run):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "notes.txt").write_text("mine")
    before = snapshot(run_dir)
    run_cli(*FAST, "epochs=1", "latent_dim=4", f"hydra.run.dir={run_dir}", "overwrite=true")
    assert "latent_dim: 4" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert [p.name for p in (run_dir / "checkpoints").glob("best-*")] == ["best-epoch000.ckpt"]  # the old best is gone
    assert not (run_dir / "notes.txt").exists()
    # nothing is deleted: the old run, the user's notes in it included, is moved aside whole
    [aside] = tmp_path.glob("run.replaced-*")
    assert {str(p).replace(str(aside), str(run_dir), 1): data for p, data in snapshot(aside).items()} == before
    assert (aside / "notes.txt").read_text() == "mine"


def test_runs_started_at_once_get_their_own_directories(tmp_path):
    """Eight processes claiming the same default <date>/<time> at once each get their own directory."""
    from concurrent.futures import ProcessPoolExecutor

    from vaelab.runs.rundir import claim

    base = tmp_path / "outputs" / "2026-12-01" / "12-00-00"
    with ProcessPoolExecutor(4) as pool:
        claimed = list(pool.map(claim, [base] * 8, [True] * 8, ["hydra.run.dir"] * 8))
    assert len(set(claimed)) == 8 and claimed[0].parent == base.parent
    assert sorted(p.name for p in base.parent.iterdir()) == sorted(["12-00-00", *(f"12-00-00-{n}" for n in range(2, 9))])


def test_two_real_runs_at_once_keep_both_records(tmp_path):
    """Started together (usually in the same second): both finish, each with its own config and metrics."""
    env = {"VAELAB_ROOT": str(tmp_path)}
    args = [*FAST, "epochs=1", "trainer.limit_train_batches=2", "latent_dim=4", "~callbacks.latent_map"]
    full_env = {**os.environ, "VAELAB_DATA_DIR": str(DATA_DIR), **env}
    procs = [
        subprocess.Popen(
            [str(BIN / "vaelab-train"), *args, f"seed={s}"],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=full_env,
        )
        for s in (1, 2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    runs = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/metrics.json"))
    assert len(runs) == 2
    assert sorted((r / ".hydra" / "overrides.yaml").read_text().count("seed=") for r in runs) == [1, 1]
    assert {"seed=1" in (r / ".hydra" / "overrides.yaml").read_text() for r in runs} == {True, False}
