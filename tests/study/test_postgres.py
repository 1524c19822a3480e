"""Studies on a PostgreSQL storage, against a real server started for the session
(tests/servers.py): a study, a driver killed at every moment and rerun, two studies at once in
one database, the journal table's numbering under two writers, a study begun in Optuna's own
tables, and optuna-dashboard reading the database."""

import threading
import wsgiref.util
from collections import Counter

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from pipeline.__main__ import main
from pipeline.study.database import TABLE, JournalTable, connect
from pipeline.study.driver import run_study
from pipeline.study.optuna_setup import Journal, open_storage
from tests.conftest import study_config
from tests.servers import PASSWORD_ROLE, refusing_port, silent_server
from tests.study.study_processes import (
    TINY,
    kill_at_every_moment,
    losses_by_point,
    reap,
    study_process,
    write_config,
)

SEARCH = {"train.seed": [0, 1, 2], "train.lr": [0.1, 0.3]}  # within SEED_BY_LR


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url, name)).trials


def test_postgres_study_completes_every_grid_point_once(tmp_path, ray_session, database):
    config = study_config(tmp_path, search=SEARCH, **TINY, **{"study.storage": database})
    outcome = run_study(config, progress=False)
    assert outcome.counts == {"COMPLETE": 6}
    trials = _trials(database, config.study.name)
    # The database holds each grid point once, COMPLETE, with the value recorded in Parquet.
    assert Counter(t.state.name for t in trials) == {"COMPLETE": 6}
    assert len({(t.params["seed"], t.params["lr"]) for t in trials}) == 6
    recorded = pd.read_parquet(config.output + "/trials.parquet").set_index("trial")
    assert {t.number: t.value for t in trials} == recorded["value"].to_dict()


def test_postgres_driver_killed_at_every_moment_ends_with_the_losses_of_each_point_alone(
    tmp_path, database, seed_by_lr_losses
):
    config = study_config(tmp_path, search=SEARCH, **TINY, **{"study.storage": database})
    output = tmp_path / "killed"
    kill_at_every_moment(write_config(tmp_path, config), output)
    trials = pd.read_parquet(output / "trials.parquet")
    assert len(trials) == 6 and (trials["state"] == "COMPLETE").all()
    killed = losses_by_point(pd.read_parquet(output / "steps"), ["seed", "lr"])
    # Every grid point exactly once, with the very losses it gives trained alone: the storage
    # changes no loss.
    assert len(killed) == 6
    for point, losses in killed.items():
        assert np.array_equal(losses, seed_by_lr_losses[point]), point
    states = Counter(t.state.name for t in _trials(database, config.study.name))
    assert states["COMPLETE"] == 6 and states["FAIL"] >= 1


def test_postgres_two_studies_run_at_once_in_one_database(tmp_path, database):
    drivers = {}
    for name in ("first", "second"):
        config = study_config(
            tmp_path / name, search=SEARCH, **TINY,
            **{"study.storage": database, "study.name": name},
        )  # fmt: skip
        (tmp_path / name).mkdir()
        drivers[name] = (study_process(write_config(tmp_path / name, config), tmp_path / name
                                        / "out"), config)  # fmt: skip
    for name, (driver, _) in drivers.items():
        try:
            _, err = driver.communicate(timeout=300)
        finally:
            reap(driver)
        assert driver.returncode == 0, (name, err[-2000:])
    for name in drivers:
        # Each study holds its own six grid points, all COMPLETE, none of the other's.
        assert Counter(t.state.name for t in _trials(database, name)) == {"COMPLETE": 6}
        trials = pd.read_parquet(tmp_path / name / "out" / "trials.parquet")
        assert len(trials) == 6 and (trials["state"] == "COMPLETE").all()


def test_database_journal_numbers_two_writers_logs_without_a_gap(database):
    writers = [JournalTable(database) for _ in range(2)]

    def append(writer: JournalTable, who: int) -> None:
        for i in range(40):
            if i % 4 == 0:
                with writer.group():
                    writer.append_logs([{"who": who, "i": i}])
                    writer.append_logs([{"who": who, "i": i + 0.5}])
            else:
                writer.append_logs([{"who": who, "i": i}])

    threads = [threading.Thread(target=append, args=(w, n)) for n, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with connect(database) as conn:
        numbers = [n for (n,) in conn.execute(f"SELECT number FROM {TABLE} ORDER BY number")]
    logs = writers[0].read_logs(0)
    # Numbers run from 0 without a gap, and each writer's logs keep their order.
    assert numbers == list(range(100))
    for who in (0, 1):
        mine = [log["i"] for log in logs if log["who"] == who]
        assert mine == sorted(mine) and len(mine) == 50


def test_database_journal_tables_opened_at_once_on_a_new_database_all_open(database):
    barrier, errors = threading.Barrier(8), []

    def open_one() -> None:
        barrier.wait()
        try:
            JournalTable(database)
        except Exception as error:  # whatever it raises, the test counts it
            errors.append(error)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Drivers starting together on a new database (two studies, a restarted head and a
    # job) all open it: one creates the table, the others wait for it rather than collide.
    assert errors == []


def test_database_group_that_raises_writes_nothing(database):
    journal = JournalTable(database)
    with pytest.raises(RuntimeError), journal.group():
        journal.append_logs([{"op": 1}])
        # Within the group, this process reads its own logs after the table's.
        assert journal.read_logs(0) == [{"op": 1}]
        raise RuntimeError("killed")
    # The group's logs never reached the table.
    assert JournalTable(database).read_logs(0) == []


def test_postgres_study_begun_in_optunas_own_tables_goes_on_there(database):
    optuna.create_study(storage=database, study_name="older").ask()
    # A study Optuna's RDB storage holds is opened there, not in a new journal.
    storage = open_storage(database, "older")
    assert not isinstance(storage, Journal)
    assert len(optuna.load_study(study_name="older", storage=storage).trials) == 1
    assert isinstance(open_storage(database, "newer"), Journal)


def test_postgres_study_is_read_by_optuna_dashboard(database):
    dashboard = pytest.importorskip("optuna_dashboard")
    storage = open_storage(database, "shown")
    study = optuna.create_study(storage=storage, study_name="shown")
    study.tell(study.ask(), 0.5)
    app = dashboard.wsgi(open_storage(database, "shown"))
    environ = {"PATH_INFO": "/api/studies", "REQUEST_METHOD": "GET"}
    wsgiref.util.setup_testing_defaults(environ)
    statuses = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    # The dashboard's API lists the study the pipeline's storage holds.
    assert statuses == ["200 OK"] and b'"study_name": "shown"' in body


BAD_STUDY = {
    "task": {"series_length": 1500},
    "model": {"num_layers": 1},
    "train": {"epochs": 1, "compile": False},
    "study": {"name": "bad", "search": {"task.echo_step": [1, 20]}},
}


def _refused(tmp_path, capsys, storage: str, message: str) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**BAD_STUDY, "study": {**BAD_STUDY["study"],
                                                          "storage": storage}}))  # fmt: skip
    out = tmp_path / "out"
    assert main(["study", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    # One line that names the storage and the problem; nothing written.
    assert err.count("\n") == 1 and err.startswith("error: study.storage = "), err
    assert message in err, err
    assert not out.exists()
    return err


def test_postgres_server_that_refuses_is_one_line_exit_2(tmp_path, capsys):
    port = refusing_port()
    _refused(tmp_path, capsys, f"postgresql://echo@127.0.0.1:{port}/db",
             f"Connection refused; no database server answers at 127.0.0.1:{port}")  # fmt: skip


def test_postgres_server_that_does_not_answer_is_one_line_exit_2(tmp_path, capsys):
    with silent_server() as port:
        _refused(tmp_path, capsys, f"postgresql://echo@127.0.0.1:{port}/db?connect_timeout=1",
                 f"timeout expired; no database server answers at 127.0.0.1:{port}")  # fmt: skip


def test_postgres_wrong_password_is_one_line_exit_2_without_the_password(
    tmp_path, capsys, postgres_server, database
):
    url = postgres_server.url(database.rsplit("/", 1)[1], PASSWORD_ROLE, "wrong-password")
    err = _refused(tmp_path, capsys, url, "password authentication failed")
    assert "wrong-password" not in err and f"{PASSWORD_ROLE}:***@" in err


def test_postgres_missing_database_is_one_line_exit_2(tmp_path, capsys, postgres_server):
    _refused(tmp_path, capsys, postgres_server.url("no_such_db"),
             'database "no_such_db" does not exist; create it first')  # fmt: skip
