"""What a command says when it is stopped or refused during start-up: one line, the right exit status, and the
value that is really in effect. Each case failed on 4c48284 (a silent exit 143, a traceback, or the wrong value)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import DATA_DIR, REPO, default_signals, one_line, run_cli

CHECKPOINT = REPO / "tests" / "fixtures" / "run-4c48284" / "checkpoints" / "last.ckpt"


def python_c(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python -c script args...`: a command started by a script that arranges its stop (as a shell starts it)."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VAELAB_DATA_DIR": str(DATA_DIR)},
        stdin=subprocess.DEVNULL,
        preexec_fn=default_signals,
    )


# SIGTERM sent by the process to itself just as `module` is first imported: a stop at a chosen point of start-up.
SIGTERM_AT_AN_IMPORT = """
import os, signal, sys
module, tool, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]

class Term:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)

sys.meta_path.insert(0, Term())
import vaelab.commands.cli
getattr(vaelab.commands.cli, {"vaelab-train": "train", "vaelab-eval": "evaluate", "vaelab-generate": "generate"}[tool])()
"""


@pytest.mark.parametrize(
    "tool, module, before",
    [
        ("vaelab-eval", "torch.nn.functional", "any result was written"),
        ("vaelab-generate", "torch.nn.functional", "any result was written"),
        ("vaelab-eval", "hydra.utils", "any result was written"),
        ("vaelab-train", "pytorch_lightning", "training started"),
    ],
)
def test_sigterm_during_start_up_is_one_line(tmp_path, tool, module, before):
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}"] + ([f"ckpt_path={CHECKPOINT}"] if tool != "vaelab-train" else ["epochs=1"])
    proc = python_c(SIGTERM_AT_AN_IMPORT, module, tool, *args)
    line = one_line(proc, f"{tool}: interrupted: stopped by SIGTERM before {before}", code=128 + signal.SIGTERM)
    assert not (run_dir / "eval.json").exists() and not (run_dir / "checkpoints").exists()
    if run_dir.exists():  # claimed before the signal came: the line says where it is, and what it holds
        assert line.endswith(f"; {run_dir} holds only its settings and log")
        assert {p.name for p in run_dir.iterdir()} <= {".vaelab", ".hydra", "train.log", "eval.log", "generate.log"}
    else:
        assert str(run_dir) not in line


# SIGTERM sent by vaelab-eval to itself once it has written eval.json, as it goes on to print its summary.
SIGTERM_AFTER_EVAL_JSON = """
import os, signal, sys
import vaelab.commands.cli, vaelab.commands.evaluate as evaluate
summary = evaluate.summary

def summary_then_stop(result):
    os.kill(os.getpid(), signal.SIGTERM)
    return summary(result)

evaluate.summary = summary_then_stop
sys.argv[0] = "vaelab-eval"
vaelab.commands.cli.evaluate()
"""


def test_sigterm_after_eval_json_was_written_is_one_line(tmp_path):
    """It ended the command with exit status 143 and no line."""
    run_dir = tmp_path / "run"
    args = [f"ckpt_path={CHECKPOINT}", f"hydra.run.dir={run_dir}", "num_images=20", "linear_probe.enabled=false"]
    proc = python_c(SIGTERM_AFTER_EVAL_JSON, *args, "frechet.enabled=false")
    line = one_line(proc, f"vaelab-eval: interrupted: stopped by SIGTERM after {run_dir}/eval.json was written", code=143)
    assert line.endswith("the results are complete") and (run_dir / "eval.json").stat().st_size > 0


def test_a_key_given_twice_is_refused_with_the_value_in_effect(tmp_path):
    proc = run_cli("latent_dim=8", "latent_dim=null", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    one_line(proc, "vaelab-train: error: latent_dim=null is not allowed", code=1)
    proc = run_cli("latent_dim=abc", "latent_dim=8", "latent_dim=x2", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    one_line(proc, "vaelab-train: error: latent_dim=x2 is not allowed", code=1)


@pytest.mark.parametrize("tool", ["vaelab-train", "vaelab-eval", "vaelab-generate"])
def test_cfg_job_resolve_prints_the_resolved_settings(tmp_path, tool):
    proc = run_cli("--cfg", "job", "--resolve", f"ckpt_path={CHECKPOINT}", tool=tool, cwd=tmp_path)
    assert "output_dir: null" in proc.stdout and "${" not in proc.stdout and not proc.stderr.strip()
    assert not any(tmp_path.iterdir())  # printing the settings writes nothing


@pytest.mark.parametrize(
    "flags, start",
    [
        (["--resolve"], "vaelab-train: error: The --resolve flag can only be used in conjunction with --cfg or --help;"),
        (["--cfg", "job", "-m", "latent_dim=2,4"], "vaelab-train: error: Only one of --run, --multirun, --cfg"),
        (["--cfg", "hydra", "--resolve"], "vaelab-train: error: Interpolation key 'paths.log_dir' not found;"),
    ],
)
def test_hydra_flags_it_refuses_are_one_line(tmp_path, flags, start):
    proc = run_cli(*flags, check=False, cwd=tmp_path)
    line = one_line(proc, start, code=1)
    assert "--hydra-help" in line


def test_an_image_shape_the_data_does_not_have_is_refused_before_training(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("data.image_shape=[1,32,32]", "epochs=1", f"hydra.run.dir={run_dir}", check=False)
    one_line(proc, "vaelab-train: error: data.image_shape=[1,32,32] does not match FashionMNIST's images, which are [1,28,28]")
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "checkpoints").exists()
