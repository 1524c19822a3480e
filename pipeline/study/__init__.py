"""The study: an Optuna study whose trials run in trainers on Ray.

- launch.py: embedded Ray or a cluster, decided once before Ray is imported; compile ahead.
- driver.py: `run_study` and the driver loop (ask, place, relay pruning, record, tell);
  records.py: the trials it asked and the trainers it placed them on; asking.py: its asks,
  each point of the search space once, with the seed from its parameters.
- placement.py: which trainer takes a trial; a grid's order.
- optuna_setup.py: samplers, pruners, distributions and storages; database.py: a PostgreSQL
  storage as Optuna's journal in one table, written a group of asks and tells at a time.
- ray_connection.py: starting an embedded Ray on 127.0.0.1, or joining a cluster; whether a
  trainer fits on a node.
- locations.py: outputs and storages that a study could not keep, refused before Ray starts.
- trainer.py: the trainer actor; exchange.py: what it tells the driver.
- compile_ahead.py: the CPU kernels' compile while the driver starts.
- progress.py: the progress bar or lines; failpoints.py (in results): fault injection for tests.

`from pipeline.study import run_study` works; importing this package imports no Ray, so that
the command line can start compiling before Ray's import.
"""


def __getattr__(name: str):
    if name in ("run_study", "StudyOutcome"):
        from pipeline.study import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
