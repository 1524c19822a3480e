"""Results: the output folder (or URI) and its lock, the Parquet tables, recording finished
trials, and each trial's metrics.

- output.py: `Output`, a study's folder or object-store prefix: atomic writes, its lock, its
  config.yaml.
- tables.py: the columns and types of steps/ and trials.parquet; `load_steps`, `load_trials`.
- metrics.py: what a trial's losses say (final loss, steps to converge, objective value).
- record.py: the one function that records finished trials.
- object_store.py: an s3:// output's checks before a study (credentials, endpoint, bucket).
- failpoints.py: fault injection for tests, for the driver and the writer alike.
"""
