"""Checkpoint files as untrusted input: crafted checkpoints are refused in one line before anything they name is
called (proven by a file that must not appear), damaged and foreign files are named, atomic writes."""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_cli
from vaelab.errors import UserError
from vaelab.model.networks import DenseEncoder
from vaelab.runs.checkpoint_io import AtomicCheckpointIO
from vaelab.runs.checkpoints import check_buildable, check_contents, load_vae, network_class, read_checkpoint
from vaelab.runs.settings import MODEL

MODULE = """
from pathlib import Path
import torch

def make(path):  # a function with a side effect: must never run
    Path(path).write_text("ran")
    return torch.nn.Identity()

class Encoder(torch.nn.Module):  # a user's own network class
    def __init__(self, latent_dim, image_shape=(1, 28, 28)):
        super().__init__()
        self.inner = __import__("vaelab.model.networks", fromlist=["DenseEncoder"]).DenseEncoder(latent_dim, image_shape)
    def forward(self, x):
        return self.inner(x)
"""


class Evil:
    """Pickles as a call to os.system: weights-only unpickling must refuse it, never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "user_nets.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def crafted(good: Path, tmp_path: Path, marker: Path, change) -> Path:
    checkpoint = torch.load(good, weights_only=True)
    change(checkpoint["hyper_parameters"])
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


def attack(marker: Path) -> dict:
    """Each crafted encoder spec: what it would do if built."""
    touch = {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}
    return {
        "attribute path traversal": {
            "_target_": "vaelab.model.networks.torch.serialization.os.system",
            "_args_": [f"touch {marker}"],
        },
        "traversal from torch.nn": {"_target_": "torch.nn.modules.module.os.system", "_args_": [f"touch {marker}"]},
        "a nested target in the arguments": {
            "_target_": "vaelab.model.networks.DenseEncoder",
            "latent_dim": 16,
            "image_shape": touch,
        },
        "a function": {"_target_": "user_nets.make", "_args_": [str(marker)]},
        "a class of a module not allowed": {"_target_": "subprocess.Popen", "_args_": [["touch", str(marker)]]},
        "a function of torch.nn": {"_target_": "torch.nn.init.ones_", "_args_": [[1.0]]},
        "a hidden Hydra key": {"_target_": "vaelab.model.networks.DenseEncoder", "latent_dim": 16, "_partial_": True},
    }


@pytest.mark.parametrize("case", list(attack(Path("x"))))
def test_crafted_checkpoints_are_refused_before_anything_is_called(tmp_path, trained_run, user_module, case):
    marker = tmp_path / "marker"
    path = crafted(
        trained_run / "checkpoints" / "last.ckpt", tmp_path, marker, lambda hp: hp.__setitem__("encoder", attack(marker)[case])
    )
    # user_nets is allowed here, so that only "it is a function" can refuse user_nets.make
    with pytest.raises(UserError) as err:
        load_vae(path, allow_networks=("user_nets",))
    assert "refusing" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_a_pickle_global_is_never_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"encoder": Evil(marker)}}, path)
    with pytest.raises(UserError, match=r"it holds a Python object \(posix.system\) that weights-only loading refuses"):
        load_vae(path)
    assert not marker.exists()
    torch.save({"state_dict": {}, "hyper_parameters": {"callback": collections.defaultdict(int)}}, path)
    with pytest.raises(UserError, match="refuses to unpickle"):
        read_checkpoint(path, "ckpt_path=x")


@pytest.mark.parametrize("tool", ["vaelab-eval", "vaelab-generate", "vaelab-train"])
def test_crafted_checkpoints_from_the_shell_run_nothing(tmp_path, trained_run, tool):
    marker = tmp_path / "marker"
    traversal = crafted(
        trained_run / "checkpoints" / "last.ckpt",
        tmp_path,
        marker,
        lambda hp: hp.__setitem__(
            "decoder", {"_target_": "vaelab.model.networks.torch.serialization.os.system", "_args_": [f"touch {marker}"]}
        ),
    )
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"encoder": Evil(marker)}}, pickled)
    for path in (traversal, pickled):
        args = [f"ckpt_path={path}", f"hydra.run.dir={tmp_path / path.stem}"] + (FAST if tool == "vaelab-train" else [])
        proc = run_cli(*args, tool=tool, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(f"{tool}: error: ") and ("refusing" in line or "refuses to unpickle" in line), line
        assert not marker.exists()


def test_only_network_classes_of_allowed_modules_resolve(user_module):
    assert network_class("vaelab.model.networks.DenseEncoder") is DenseEncoder
    assert network_class("torch.nn.Linear") is torch.nn.Linear
    assert network_class("torch.nn.modules.linear.Linear") is torch.nn.Linear
    for target in [
        "vaelab.model.networks.torch.nn.Linear",
        "torch.nn.functional.torch",
        "torch.nn.Linear.__init__",
        "os.system",
        "vaelab.model.networks.math",
        "vaelab.model.networks",
        "",
        "user_nets.Encoder",
        "vaelab.model.networks.DenseEncoder.mro",
    ]:
        with pytest.raises(UserError, match="refusing to build"):
            network_class(target)
    sys.modules.pop("user_nets", None)
    with pytest.raises(UserError):
        network_class("user_nets.Encoder")
    assert "user_nets" not in sys.modules
    assert network_class("user_nets.Encoder", ("user_nets.Encoder",)).__name__ == "Encoder"  # allowed by name
    assert network_class("user_nets.Encoder", ("user_nets",)).__name__ == "Encoder"  # or by module


def test_arguments_must_be_plain_data():
    check_buildable(
        {"_target_": "vaelab.model.networks.DenseEncoder", "latent_dim": 2, "hidden": [3, 4], "image_shape": (1, 2, 2)}
    )
    for bad in [
        {"_target_": "vaelab.model.networks.DenseEncoder", "latent_dim": torch.zeros(1)},
        {"_target_": "vaelab.model.networks.DenseEncoder", "_convert_": "all", "x": {"_target_": "os.getcwd"}},
        {1: "a"},
    ]:
        with pytest.raises(UserError, match="refusing"):
            check_buildable(bad)


def test_a_users_own_network_loads_when_allowed(tmp_path, trained_run, user_module):
    path = crafted(
        trained_run / "checkpoints" / "last.ckpt",
        tmp_path,
        tmp_path / "m",
        lambda hp: hp.__setitem__("encoder", {"_target_": "user_nets.Encoder", "latent_dim": 16, "image_shape": [1, 28, 28]}),
    )
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {
        k.replace("vae.encoder.", "vae.encoder.inner.", 1) if k.startswith("vae.encoder.") else k: v
        for k, v in checkpoint["state_dict"].items()
    }
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match="refusing to build 'user_nets.Encoder'"):
        load_vae(path)
    vae = load_vae(path, allow_networks=("user_nets.Encoder",))
    assert type(vae.encoder).__name__ == "Encoder" and vae.sample(2).shape == (2, 1, 28, 28)


def test_damaged_and_foreign_files_are_named(tmp_path, trained_run):
    good = trained_run / "checkpoints" / "last.ckpt"
    raw = good.read_bytes()
    cases = {
        "text.ckpt": (b"not a checkpoint\n", "is truncated or damaged"),
        "truncated.ckpt": (raw[:4096], "is truncated or damaged"),
        "flipped.ckpt": (
            raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0xFF]) + raw[len(raw) // 2 + 1 :],
            "fails its CRC check",
        ),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as err:
            load_vae(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and reason in str(err.value)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(UserError, match="not a vaelab checkpoint"):
        load_vae(foreign)
    resized = crafted(good, tmp_path, tmp_path / "m", lambda hp: hp["encoder"].__setitem__("latent_dim", 8))
    with pytest.raises(
        UserError, match=r"holds a different network: encoder.heads.weight is \[32, 784\] in the checkpoint but \[16, 784\]"
    ):
        load_vae(resized)
    with pytest.raises(UserError, match="not found"):
        load_vae(tmp_path / "missing.ckpt")
    with pytest.raises(UserError, match="is a directory"):
        load_vae(tmp_path)


def test_evaluation_never_builds_the_optimizer(tmp_path, trained_run):
    path = crafted(
        trained_run / "checkpoints" / "last.ckpt",
        tmp_path,
        tmp_path / "m",
        lambda hp: hp.__setitem__("optimizer", {"_target_": "os.system", "_args_": ["true"]}),
    )
    assert load_vae(path).settings.get("optimizer") is None


def test_atomic_checkpoint_io_leaves_the_old_file_whole_when_a_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    before = target.read_bytes()
    assert zipfile.ZipFile(target).testzip() is None

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left on device") as err:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    assert err.value.filename == str(target)  # the checkpoint is named, not the temporary file
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_removing_the_spawn_launchers_weights_removes_its_folder_only_when_empty(tmp_path, monkeypatch):
    """Lightning's spawn launcher writes <tempfile.mkdtemp()>/.temp.ckpt and removes the file; its folder goes with it,
    but never a folder outside the temp dir, one with anything else in it, or the folder of any other checkpoint."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    io, state = AtomicCheckpointIO(), {"state_dict": {"w": torch.ones(3)}}
    spawned, crowded, outside, other = (Path(tempfile.mkdtemp()) for _ in range(4))
    outside = outside / "deeper"
    files = [spawned / ".temp.ckpt", crowded / ".temp.ckpt", outside / ".temp.ckpt", other / "last.ckpt"]
    for path in files:
        io.save_checkpoint(state, path)
    (crowded / "someone-elses.txt").write_text("kept")
    for path in files:
        io.remove_checkpoint(path)
        assert not path.exists()
    assert not spawned.exists()
    assert [p.name for p in crowded.iterdir()] == ["someone-elses.txt"] and outside.is_dir() and other.is_dir()


def tampered_copy(run_dir: Path, change, path: Path) -> Path:
    """The run's last checkpoint, changed by `change`, saved at `path`."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    return path


# A checkpoint's contents are data like any setting: each field the commands read, tampered with.
TAMPERED = {
    "weights that are not tensors": (
        lambda c: c["state_dict"].__setitem__("vae.encoder.heads.weight", 5),
        "its state_dict is not",
    ),
    "NaN weights": (
        lambda c: c["state_dict"]["vae.encoder.heads.weight"].fill_(float("nan")),
        "its weights hold NaN or infinite",
    ),
    "a latent_dim that is text": (
        lambda c: c["hyper_parameters"].__setitem__("latent_dim", "abc"),
        "hyper_parameters.latent_dim='abc'",
    ),
    "hyper_parameters that are a list": (lambda c: c.__setitem__("hyper_parameters", [1]), "its hyper_parameters are a list"),
    "an epoch that is text": (lambda c: c.__setitem__("epoch", "abc"), "its epoch is 'abc', not an integer"),
    "loops that are a list": (lambda c: c.__setitem__("loops", [1]), "its loops is [1], not a dict"),
    "an optimizer state that is not one": (
        lambda c: c.__setitem__("optimizer_states", [{"state": 5}]),
        "its optimizer_states are not optimizer state dicts",
    ),
    "an optimizer state of another network": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].__setitem__("params", [0]),
        "its optimizer state does not fit the optimizer of these settings",
    ),
    "class names that are not a list of names": (
        lambda c: c["hyper_parameters"].update(conditional=True, class_names=5),
        "its hyper_parameters.class_names=5 is not a list of class names",
    ),
    "a conditional model without class names": (
        lambda c: c["hyper_parameters"].update(conditional=True, class_names=[]),
        "its hyper_parameters.conditional is true but it names no class_names",
    ),
}
# vaelab-eval reads the weights and the model's settings; vaelab-train (ckpt_path=) the training state as well.
# Both read it with read_checkpoint: every case from the shell through vaelab-train, one through vaelab-eval, and
# what vaelab-eval and vaelab-generate read (load_vae) in-process below.
READ_BY_EVAL = [*list(TAMPERED)[:4], *list(TAMPERED)[-2:]]
TAMPERED_CASES = [("vaelab-eval", "class names that are not a list of names")] + [("vaelab-train", case) for case in TAMPERED]


@pytest.mark.parametrize("tool,case", TAMPERED_CASES, ids=[f"{t}:{c}" for t, c in TAMPERED_CASES])
def test_tampered_checkpoint_contents_are_one_line(tmp_path, trained_run, tool, case):
    from conftest import one_line, snapshot

    change, says = TAMPERED[case]
    path = tampered_copy(trained_run, change, tmp_path / "tampered.ckpt")
    before = snapshot(trained_run)
    args = [f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}"] + (
        [*FAST, "epochs=3", "latent_dim=16"] if tool == "vaelab-train" else ["num_images=10"]
    )
    line = one_line(run_cli(*args, tool=tool, check=False), f"{tool}: error: ")
    assert says in line and ("ckpt_path=" in line or "vaelab-resume" in line or "start a new run" in line), line
    assert snapshot(trained_run) == before and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("case", READ_BY_EVAL)
def test_what_eval_and_generate_load_of_a_tampered_checkpoint_is_refused(tmp_path, trained_run, case):
    change, says = TAMPERED[case]
    path = tampered_copy(trained_run, change, tmp_path / "tampered.ckpt")
    with pytest.raises(UserError) as refused:
        load_vae(path)
    assert says in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("path", list(MODEL))
def test_every_model_setting_a_checkpoint_records_is_checked_by_its_one_declaration(path):
    """hyper_parameters.<name> (and .<part>.<name>) is checked by vaelab-train's model.<name>, in its words."""
    *parts, name = path.split(".")[1:]
    hparams: dict = {"latent_dim": 16}
    node = hparams
    for part in parts:
        node = node.setdefault(part, {})
    check_contents({"state_dict": {}, "hyper_parameters": hparams}, "x.ckpt")  # without the setting: fine
    node[name] = "abc"  # text: no model setting allows it
    with pytest.raises(UserError) as refused:
        check_contents({"state_dict": {}, "hyper_parameters": hparams}, "x.ckpt")
    recorded = ".".join((*parts, name))
    assert f"its hyper_parameters.{recorded}='abc' is not {MODEL[path].allowed}; pass ckpt_path=" in str(refused.value)
