"""What a study prints to a log (a Ray job's) while it runs."""

from pipeline.study.progress import Progress


def _row(trial: int) -> dict:
    return {"trial": trial, "state": "COMPLETE", "value": 0.5, "error": None, "lr": 0.3}


def test_progress_in_a_log_says_what_runs_once_no_trial_finished_for_its_heartbeat(capsys):
    quiet = Progress(total=3, bar=False)  # a minute's heartbeat: the first tick is too soon
    quiet.tick(running=2)
    assert capsys.readouterr().out == ""
    beating = Progress(total=3, bar=False, heartbeat_s=0)
    beating.record(_row(0), ["lr"])
    beating.tick(running=2)
    lines = capsys.readouterr().out.splitlines()
    # A line for the finished trial, then the heartbeat: what runs and how far the study is.
    assert lines[0] == "trial 0 COMPLETE value=0.5 [lr=0.3] 1/3"
    assert lines[1].startswith("2 trials running, 1/3 finished, 0m00s since the study started")


def test_progress_on_a_terminal_draws_a_bar_and_no_heartbeat(capsys):
    bar = Progress(total=3, bar=True, heartbeat_s=0)
    bar.tick(running=2)
    bar.close()
    assert "trials running" not in capsys.readouterr().out
