import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.__main__ import main
from tests.conftest import SMALL, python_output

TUTORIAL = Path(__file__).parent.parent / "configs" / "tutorial.yaml"


def _write_config(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(text)
    return path


def _small_config_file(folder: Path, **changes: dict) -> Path:
    raw = {section: dict(values) for section, values in SMALL.items()}
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return _write_config(folder, yaml.safe_dump(raw))


def test_cli_train_writes_steps_trials_config_and_figure(tmp_path, capsys):
    config = _small_config_file(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(config), "--output", str(out), "--set", "train.seed=2"]) == 0
    printed = capsys.readouterr().out
    assert "New data, epoch 0" in printed and "New data, epoch 1" in printed
    assert "Step 0 Batch loss 0.6" in printed
    steps = pd.read_parquet(out / "steps")
    assert len(steps) == 2 * 20
    assert list(steps.columns[:5]) == ["trial", "epoch", "window", "step", "loss"]
    assert {"num_layers", "state_size", "echo_step", "lr"} <= set(steps.columns)
    assert steps["loss"].dtype == np.float32 and steps["epoch"].dtype == np.int16
    assert steps["step"].tolist() == list(range(40))
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials.loc[0, "state"] == "COMPLETE" and trials.loc[0, "trial_seed"] == 2
    assert trials.loc[0, "value"] == pytest.approx(steps["loss"].iloc[20:].mean(), rel=1e-5)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 2
    assert (out / "plots" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_train_tutorial_behaves_like_the_tutorial(tmp_path, capsys):
    out = tmp_path / "tutorial"
    # As a user runs it: the config's defaults (the numba kernels on the CPU).
    assert main(["train", str(TUTORIAL), "--output", str(out)]) == 0
    steps = pd.read_parquet(out / "steps")
    # 50,000 values in 5 rows of 10,000 columns: 666 windows of 15 per epoch, 5 epochs.
    assert len(steps) == 3330 and steps["window"].max() == 665 and steps["epoch"].max() == 4
    loss = steps["loss"].to_numpy()
    assert 0.66 < loss[0] < 0.73
    moving = np.convolve(loss, np.full(100, 0.01), "valid")
    assert moving[: 2 * 666 - 99].min() < 0.01  # converged within the first two epochs
    assert loss[-100:].mean() < 2e-3  # and keeps improving, towards the tutorial's 2e-4
    assert "Step 600 Batch loss" in capsys.readouterr().out


def test_cli_train_reruns_into_its_own_output_but_refuses_another_config(tmp_path, capsys):
    config = _small_config_file(tmp_path, train={"epochs": 1})
    out = tmp_path / "run"
    assert main(["train", str(config), "--output", str(out)]) == 0
    first = pd.read_parquet(out / "steps")
    assert main(["train", str(config), "--output", str(out)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "steps"), first)
    capsys.readouterr()
    assert main(["train", str(config), "--output", str(out), "--set", "task.echo_step=5"]) == 2
    err = capsys.readouterr().err
    assert "task.echo_step: 3 there, 5 here" in err
    pd.testing.assert_frame_equal(pd.read_parquet(out / "steps"), first)


BAD_CONFIGS = {
    "unknown section": ("modle: {num_layers: 2}", "did you mean model?"),
    "misspelled key": ("model: {num_layer: 2}", "did you mean model.num_layers?"),
    "wrong type": ("model: {num_layers: three}", "model.num_layers = 'three': must be an integer"),
    "negative echo": ("task: {echo_step: -1}", "task.echo_step = -1"),
    "echo beyond series": ("task: {echo_step: 50000}", "must be < task.series_length"),
    "zero batch": ("task: {batch_size: 0}", "task.batch_size = 0"),
    "zero truncation": ("task: {truncation: 0}", "task.truncation = 0"),
    "zero state": ("model: {state_size: 0}", "model.state_size = 0"),
    "zero layers": ("model: {num_layers: 0}", "model.num_layers = 0"),
    "zero epochs": ("train: {epochs: 0}", "train.epochs = 0"),
    "zero lr": ("train: {lr: 0}", "train.lr = 0"),
    "nan lr": ("train: {lr: .nan}", "train.lr = nan: must be a finite number"),
    "negative lr": ("train: {lr: -0.3}", "train.lr = -0.3"),
    "series too short": ("task: {series_length: 50}", "too short for one window"),
    "rows of unequal length": ("task: {series_length: 1001}", "multiple of task.batch_size"),
    "fractional epochs": ("train: {epochs: 2.5}", "train.epochs = 2.5: must be an integer"),
    "section not a mapping": ("model: 3", "model: must be a mapping"),
    "not a mapping": ("- 1\n- 2", "must be a mapping of sections, got a list"),
    "malformed yaml": ("task: [1, 2", "not valid YAML at line"),
    "unknown device": ("train: {device: tpu}", "train.device = 'tpu'"),
    "unknown compile": ("train: {compile: sometimes}", "train.compile = 'sometimes'"),
}


@pytest.mark.parametrize("text, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_cli_train_rejects_a_bad_config_in_one_line_writing_nothing(
    tmp_path, capsys, text, message
):
    config = _write_config(tmp_path, text)
    out = tmp_path / "out"
    assert main(["train", str(config), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert message in err
    assert not out.exists()


BAD_ARGUMENTS = {
    "missing file": (["train", "no/such.yaml"], "no/such.yaml: no such config file"),
    "override without =": (
        ["train", "{config}", "--set", "model.num_layers"],
        "expected key=value",
    ),
    "override of unknown key": (["train", "{config}", "--set", "model.layers=2"], "unknown key"),
    "override out of range": (
        ["train", "{config}", "--set", "train.epochs=-1"],
        "train.epochs = -1",
    ),
    "unknown command": (["fly", "{config}"], "invalid choice: 'fly'"),
    "missing config argument": (["train"], "the following arguments are required: config"),
    "folder as config": (["train", "{folder}"], "is a folder, not a config file"),
    "no such GPU": (["train", "{config}", "--set", "train.device=cuda:3"], "CUDA devices"),
}


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_cli_rejects_bad_arguments_in_one_line_writing_nothing(tmp_path, capsys, argv, message):
    config = _small_config_file(tmp_path)
    out = tmp_path / "out"
    argv = [a.format(config=config, folder=tmp_path) for a in argv]
    assert _exit_code([*argv, "--output", str(out)] if len(argv) > 1 else argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def _exit_code(argv: list[str]) -> int:
    """main's return value, or the code argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_cli_refuses_an_output_that_is_not_an_echo_study_folder(tmp_path, capsys):
    config = _small_config_file(tmp_path)
    out = tmp_path / "holiday-photos"
    out.mkdir()
    (out / "beach.jpg").write_bytes(b"...")
    assert main(["train", str(config), "--output", str(out)]) == 2
    assert "is not an echo-study output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["beach.jpg"]


def test_cli_bad_input_in_a_real_process_exits_2_without_traceback(tmp_path):
    config = _write_config(tmp_path, "task: {echo_step: -3}\n")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", str(config), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == "error: task.echo_step = -3: must be an integer >= 0\n"
    assert not (tmp_path / "o").exists()


def test_cli_study_driver_imports_no_torch():
    # The driver never trains, and torch takes most of a second to import: only the train
    # command and the trainers that train with torch (on a GPU, or eagerly) import it.
    script = "import sys, pipeline.__main__, pipeline.study.driver; print('torch' in sys.modules)"
    assert python_output(script).strip() == "False"


def test_cli_train_falls_back_to_eager_when_compiling_fails(tmp_path):
    config = _small_config_file(tmp_path, model={"num_layers": 1}, train={"compile": True})
    env = {
        **os.environ,
        "NUMBA_DISABLE_JIT": "1",  # numba's kernels cannot compile
        "NUMBA_CACHE_DIR": str(tmp_path / "numba"),  # and find nothing cached
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", str(config), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "numba failed" in done.stderr and "training without it" in done.stderr
    assert len(pd.read_parquet(tmp_path / "o" / "steps")) == 40


@pytest.mark.parametrize("command", ["train", "study"])
def test_cli_output_that_is_a_file_is_one_line_exit_2(tmp_path, capsys, monkeypatch, command):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = _small_config_file(tmp_path, study={"search": {"task.echo_step": [1, 2]}})
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main([command, str(config), "--output", str(notes)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err, err
    assert notes.read_text() == "mine"


def test_cli_output_that_cannot_be_created_is_one_line_exit_2(tmp_path, capsys):
    # Not even root can make a folder in /proc.
    config = _small_config_file(tmp_path)
    assert main(["train", str(config), "--output", "/proc/echo-study/out"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be created here" in err, err


def test_cli_summarize_refuses_a_corrupt_steps_file_in_one_line(tmp_path, capsys):
    config = _small_config_file(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(config), "--output", str(out)]) == 0
    broken = out / "steps" / "trials-0000001-1.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    capsys.readouterr()
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["summarize", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable Parquet file" in err and broken.name in err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_cli_train_with_a_study_config_records_one_run_not_a_study(tmp_path, capsys):
    config = _small_config_file(tmp_path, study={"search": {"task.echo_step": [1, 2, 3]}})
    out = tmp_path / "out"
    assert main(["train", str(config), "--output", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["study"]["search"] == {}
    capsys.readouterr()
    assert main(["summarize", str(out)]) == 0
    assert "of the study's" not in capsys.readouterr().out


def test_cli_summarize_refuses_steps_of_an_older_layout_in_one_line(tmp_path, capsys):
    config = _small_config_file(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(config), "--output", str(out)]) == 0
    # One file per trial, its one row in the footer without a status: the layout before.
    old = pa.table({"trial": [0], "loss": [0.7]}).replace_schema_metadata(
        {b"echo_study.trial": b'{"trial": 0, "state": "COMPLETE"}'}
    )
    pq.write_table(old, out / "steps" / "trial-000000.parquet")
    capsys.readouterr()
    assert main(["summarize", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written by an older echo-study" in err


QUICK = Path(__file__).parent.parent / "configs" / "quick.yaml"
TOO_LARGE_TRAINERS = {
    "CPUs": (["ray.cpus_per_trainer=3"], "ray.cpus_per_trainer = 3: a trainer asks 3 CPU of "
             "one node, but the largest node has 2 CPU"),
    "GPUs": (["ray.gpus_per_trainer=1"], "ray.gpus_per_trainer = 1: a trainer asks 1 GPU of "
             "one node, but the largest node has 0 GPU"),
}  # fmt: skip


@pytest.mark.parametrize("overrides, line", TOO_LARGE_TRAINERS.values(), ids=TOO_LARGE_TRAINERS)
def test_cli_study_whose_trainer_fits_no_node_is_one_line_exit_2(tmp_path, overrides, line):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    sets = [arg for override in ["ray.num_cpus=2", *overrides] for arg in ("--set", override)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline", "study", str(QUICK), *sets, "--output", str(out)]
    # Its trainers would wait for Ray forever: refused at once (the timeout only guards a hang).
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, f"error: {line}\n")
    assert not out.exists()
