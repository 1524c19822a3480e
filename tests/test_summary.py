"""Convergence metrics and the study summary, on real Parquet files and a real small study."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.__main__ import main
from pipeline.config import ConvergenceConfig
from pipeline.results import load_steps
from pipeline.study import run_study
from pipeline.summary import (
    PLOTS,
    steps_to_converge,
    summarize,
    trial_metrics,
    write_summary,
)
from tests.conftest import SMALL, study_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_session):
    """A finished study: echo 1 (within the truncation of 15) and 20 (beyond) × state size 3
    and 4 × seeds 0 and 1, 2 epochs of 100 windows, converged below a 100-step mean of 0.25."""
    config = study_config(
        tmp_path_factory.mktemp("summary"),
        search={
            "task.echo_step": [1, 20],
            "model.state_size": [3, 4],
            "train.seed": [0, 1],
        },
        **{"convergence.threshold": 0.25},
    )
    run_study(config, progress=False)
    return config


@pytest.fixture(scope="module")
def summary(study):
    return write_summary(study.output)


def test_steps_to_converge_is_none_when_the_mean_never_falls_below_the_threshold():
    losses = np.full(500, 0.3)
    assert steps_to_converge(losses, threshold=0.1, window=100) is None


def test_steps_to_converge_is_the_first_step_whose_trailing_window_mean_is_below():
    losses = np.array([0.9, 0.3, 0.0, 0.0, 0.0, 0.0])
    # Means over (s - 3, s]: s=2 → 0.4, s=3 → 0.1, s=4 → 0.0; the first below 0.05 is s=4.
    assert steps_to_converge(losses, threshold=0.05, window=3) == 4
    assert steps_to_converge(losses, threshold=0.2, window=3) == 3


def test_steps_to_converge_needs_the_mean_strictly_below_the_threshold():
    assert steps_to_converge(np.full(10, 0.5), threshold=0.5, window=2) is None


def test_steps_to_converge_never_counts_a_window_that_holds_a_nan():
    losses = np.array([1.0, np.nan, 0.0, 0.0, 0.0])
    # (0, 2] holds the NaN, so the first window wholly after it, (1, 3], is the first that counts.
    assert steps_to_converge(losses, threshold=0.1, window=2) == 3


def test_steps_to_converge_is_none_for_a_series_shorter_than_the_window():
    assert steps_to_converge(np.zeros(99), threshold=0.1, window=100) is None


def test_trial_metrics_final_loss_is_the_mean_over_the_last_epoch_reached():
    losses = np.concatenate([np.full(100, 0.6), np.full(100, 0.4), np.full(50, 0.2)])
    metrics = trial_metrics(losses, 100, ConvergenceConfig(threshold=0.305, window=20))
    # A trial pruned in its third epoch: its final loss is over the 50 steps of that epoch.
    assert metrics.final_loss == pytest.approx(0.2)
    assert metrics.mean_loss == pytest.approx(0.44)
    # The 20-step mean is 0.31 at step 208 and 0.3 at step 209 (ten steps at 0.2 in it).
    assert metrics.steps_to_converge == 209 and metrics.converged


def _hand_made_trials(rows: list[tuple]) -> pd.DataFrame:
    columns = ["state", "echo_step", "final_loss", "steps_to_converge", "error"]
    trials = pd.DataFrame(rows, columns=columns)
    return trials.assign(
        trial=range(len(trials)),
        num_layers=1,
        state_size=4,
        converged=trials["steps_to_converge"].notna(),
        steps_to_converge=trials["steps_to_converge"].astype("Int64"),
    )


def test_summarize_counts_a_diverged_trial_as_trained_but_never_converged(tmp_path):
    trials = _hand_made_trials(
        [
            ("COMPLETE", 3, 0.01, 400, None),
            # Its moving average fell below the threshold before the loss became infinite.
            ("FAIL", 3, np.nan, 300, "diverged at step 900"),
        ]
    )
    row = summarize(study_config(tmp_path), trials).table.iloc[0]
    assert (row["trials"], row["failed"], row["diverged"], row["trained"]) == (2, 1, 1, 2)
    assert row["converged"] == 1 and row["converged_fraction"] == 0.5
    assert row["median_steps_to_converge"] == 400
    assert row["median_final_loss"] == pytest.approx(0.01)


def test_summarize_leaves_trials_that_raised_out_of_the_converged_fraction(tmp_path):
    trials = _hand_made_trials(
        [
            ("COMPLETE", 3, 0.01, 400, None),
            ("FAIL", 3, np.nan, None, "RuntimeError: torch sees 0 CUDA devices"),
        ]
    )
    summary = summarize(study_config(tmp_path), trials)
    row = summary.table.iloc[0]
    assert (row["trials"], row["failed"], row["diverged"], row["trained"]) == (2, 1, 0, 1)
    assert row["converged_fraction"] == 1.0
    assert any("1 raised an error" in sentence for sentence in summary.findings)


def test_summarize_quartiles_of_steps_are_over_converged_trials_only(tmp_path):
    trials = _hand_made_trials(
        [
            ("COMPLETE", 3, 0.01, 100, None),
            ("COMPLETE", 3, 0.01, 200, None),
            ("PRUNED", 3, 0.02, 300, None),
            ("COMPLETE", 3, 0.01, 500, None),
            ("PRUNED", 3, 0.6, None, None),
            ("COMPLETE", 20, 0.69, None, None),
        ]
    )
    table = summarize(study_config(tmp_path), trials).table.set_index("echo_step")
    assert table.loc[3, "converged_fraction"] == 0.8
    assert table.loc[3, "median_steps_to_converge"] == 250
    assert (table.loc[3, "steps_to_converge_q25"], table.loc[3, "steps_to_converge_q75"]) == (
        175,
        350,
    )
    # With no converged trial, the steps to converge are null, not zero.
    assert table.loc[20, ["median_steps_to_converge", "steps_to_converge_q25"]].isna().all()


def test_write_summary_of_a_study_has_one_row_per_group_with_its_counts(study, summary):
    table = pd.read_parquet(f"{study.output}/summary.parquet")
    keys = ["num_layers", "state_size", "echo_step"]
    assert [tuple(row) for row in table[keys].to_numpy()] == [
        (1, 3, 1),
        (1, 3, 20),
        (1, 4, 1),
        (1, 4, 20),
    ]
    assert (table["trials"] == 2).all() and (table["complete"] == 2).all()
    trials = pd.read_parquet(f"{study.output}/trials.parquet")
    converged = trials.groupby(keys)["converged"].sum().to_numpy()
    assert table["converged"].tolist() == converged.tolist()
    by_factor = pd.read_parquet(f"{study.output}/summary_by_factor.parquet")
    assert by_factor.groupby("factor")["trials"].sum().to_dict() == dict.fromkeys(keys, 8)


def test_write_summary_finds_the_echo_step_beyond_the_truncation_never_converged(summary):
    assert summary.never_converged_echo_steps == (20,)
    assert summary.unreachable_echo_steps == (20,)
    echo = next(s for s in summary.findings if "never converged" in s)
    assert "Echo step 20" in echo and "truncation length (15)" in echo
    # Echo step 1 is learned, and the summary says how many of its trials got there.
    learned = summary.table[summary.table["echo_step"] == 1]
    assert learned["converged"].sum() >= 3
    assert f"Echo step 1 converged in {learned['converged'].sum()} of 4" in " ".join(
        summary.findings
    )


def test_write_summary_markdown_says_what_ran_and_holds_the_findings(study, summary):
    markdown = Path(study.output, "summary.md").read_text()
    assert "Study `test-study`: grid sampler, no pruner" in markdown
    assert "`task.echo_step`: 1, 20" in markdown and "`task.truncation` = 15" in markdown
    assert "Trials by state: 8 COMPLETE, 0 PRUNED, 0 FAIL." in markdown
    assert all(sentence in markdown for sentence in summary.findings)
    assert markdown.count("\n| 1 | 3 | 1 | 2 |") == 1


def test_write_summary_plots_are_readable_pngs(study, summary):
    for name in PLOTS.values():
        path = f"{study.output}/{name}"
        with open(path, "rb") as file:
            assert file.read(8) == PNG_SIGNATURE
        with Image.open(path) as image:
            image.load()
            assert image.width >= 400 and image.height >= 250


def test_write_summary_counts_trials_whose_steps_are_newer_than_trials_parquet(study, tmp_path):
    # An interrupted study: trials.parquet was last written when only two trials had finished.
    output = tmp_path / "interrupted"
    shutil.copytree(study.output, output)
    trials = pq.read_table(output / "trials.parquet")
    pq.write_table(trials.slice(0, 2), output / "trials.parquet")
    (output / "steps" / "trial-000007.parquet").unlink()
    summary = write_summary(str(output))
    assert summary.table["trials"].sum() == 7
    assert summary.findings[0].startswith("Only 7 of the study's 8 trials have finished")


def test_load_steps_filters_return_exactly_the_matching_rows(study):
    every = pd.read_parquet(f"{study.output}/steps")
    wanted = every[(every["echo_step"] == 20) & every["state_size"].isin([3])]
    wanted = wanted.sort_values(["trial", "step"], ignore_index=True)
    loaded = load_steps(study.output, echo_step=20, state_size=[3])
    assert len(loaded) == 2 * 200
    pd.testing.assert_frame_equal(loaded, wanted)


def test_load_steps_selects_columns_and_filters_on_others(study):
    loaded = load_steps(study.output, columns=["trial", "loss"], seed=[1], echo_step=[1, 20])
    assert list(loaded.columns) == ["trial", "loss"] and len(loaded) == 4 * 200


def test_load_steps_unknown_column_raises_a_value_error_naming_it(study):
    with pytest.raises(ValueError, match="no column 'layers' in steps; columns: trial, epoch"):
        load_steps(study.output, layers=2)


def test_cli_summarize_a_train_output_writes_one_group(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    assert main(["train", str(config), "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["summarize", str(out)]) == 0
    printed = capsys.readouterr().out
    # 40 steps are fewer than the 100-step convergence window.
    assert "A single `train` run (trial 0), COMPLETE: it never converged" in printed
    assert f"Summary in {out}/" in printed
    table = pd.read_parquet(out / "summary.parquet")
    assert table[["num_layers", "state_size", "echo_step", "trials"]].values.tolist() == [
        [2, 4, 3, 1]
    ]
    assert all((out / name).read_bytes()[:8] == PNG_SIGNATURE for name in PLOTS.values())


BAD_OUTPUTS = {
    "missing folder": (None, "no such folder"),
    "not an echo-study folder": ({"beach.jpg": "..."}, "not an echo-study output"),
    "no finished trial": ({"config.yaml": yaml.safe_dump(SMALL)}, "no finished trials yet"),
    "broken config": ({"config.yaml": "task: [1, 2"}, "config.yaml: unreadable"),
}


@pytest.mark.parametrize("files, message", BAD_OUTPUTS.values(), ids=BAD_OUTPUTS.keys())
def test_cli_summarize_rejects_a_bad_folder_in_one_line_writing_nothing(
    tmp_path, capsys, files, message
):
    out = tmp_path / "out"
    if files is not None:
        out.mkdir()
        for name, text in files.items():
            (out / name).write_text(text)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["summarize", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
