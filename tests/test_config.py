import pytest
import yaml

from pipeline.config import Config, ConfigError, config_from_dict, load_config, parse_override


def test_config_defaults_are_the_tutorials_run():
    config = Config()
    assert (config.model.num_layers, config.model.state_size) == (3, 4)
    assert (config.task.echo_step, config.task.batch_size, config.task.truncation) == (3, 5, 15)
    # 50,000 values in 5 rows of 10,000 columns: 666 windows of 15, the last 10 columns unused.
    assert config.task.windows_per_epoch == 666 and config.total_steps == 5 * 666


def test_config_survives_a_round_trip_through_yaml():
    raw = {
        "model": {"num_layers": 2},
        "study": {
            "sampler": "tpe",
            "trials": 10,
            "search": {
                "train.lr": {"low": 0.05, "high": 1.0, "log": True},
                "task.echo_step": [3, 9],
            },
        },
    }
    config = config_from_dict(raw)
    assert (
        config_from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict(), sort_keys=False)))
        == config
    )


def test_config_overrides_apply_yaml_values_to_dotted_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {num_layers: 3}\n")
    config = load_config(
        path, ["model.num_layers=1", "train.lr=1e-2", "study.search.task.echo_step=[1, 15]"]
    )
    assert config.model.num_layers == 1
    # YAML 1.1 reads 1e-2 as a string; a float key takes it as the number it names.
    assert config.train.lr == 0.01
    assert config.study.search_param("task.echo_step").choices == (1, 15)
    assert config.study.grid_size == 2


def test_config_with_params_validates_what_it_replaces():
    config = Config()
    assert config.with_params({"task.echo_step": 9}).task.echo_step == 9
    with pytest.raises(ConfigError, match=r"task\.echo_step = -2"):
        config.with_params({"task.echo_step": -2})


def test_config_value_reads_a_dotted_key():
    config = Config().with_params({"model.state_size": 16, "output": "/data/x"})
    assert config.value("model.state_size") == 16 and config.value("output") == "/data/x"


def test_config_differences_ignore_how_much_runs_and_where():
    base = Config()
    # More trials, another cluster or another device may resume a study; another task may not.
    resumed = base.with_params(
        {"study.trials": 1, "ray.cpus_per_trainer": 2, "train.compile": True}
    )
    assert base.differences(resumed) == []
    assert base.differences(base.with_params({"task.truncation": 20})) == ["task.truncation"]


def test_config_override_without_a_value_names_the_form():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("model.num_layers")
    assert parse_override("ray.address=null") == ("ray.address", None)


def test_config_allows_no_value_that_a_parquet_column_cannot_hold():
    import pyarrow as pa

    from pipeline.config.sections import INT16_MAX, MAX_WINDOWS_PER_EPOCH
    from pipeline.results.tables import PARAM_TYPES, STEP_COLUMNS

    # The largest of everything at once: 32,767 epochs of 65,538 windows, the widest model.
    series = MAX_WINDOWS_PER_EPOCH * 5 * 15
    largest = Config().with_params({
        "train.epochs": INT16_MAX, "task.series_length": series, "task.echo_step": series - 1,
        "model.num_layers": INT16_MAX, "model.state_size": INT16_MAX, "train.seed": 2**63 - 1,
    })  # fmt: skip
    steps = largest.total_steps
    highest = {"epoch": INT16_MAX - 1, "window": MAX_WINDOWS_PER_EPOCH - 1, "step": steps - 1}
    highest.update({name: largest.value(key) for name, key in _param_keys().items()})
    # Every column's type holds the highest value the config allows in it...
    for name, value in highest.items():
        pa.array([value], type={**STEP_COLUMNS, **PARAM_TYPES}[name])
    # ...and one more is refused by the config, in one line.
    for key, value in [
        ("train.epochs", INT16_MAX + 1),
        ("model.num_layers", INT16_MAX + 1),
        ("model.state_size", INT16_MAX + 1),
        ("task.series_length", series + 75),
    ]:
        with pytest.raises(ConfigError, match=f"{key} = {value}"):
            Config().with_params({key: value})  # fmt: skip


def _param_keys() -> dict[str, str]:
    from pipeline.config.sections import searchable_keys

    return {key.rsplit(".", 1)[1]: key for key in searchable_keys() if key != "train.carry_state"}


def test_config_checks_a_large_grid_per_distinct_combination_in_a_fraction_of_a_second():
    import time

    # 10^5 points, whose keys meet in three sections: 100 + 100 + 10 combinations to check.
    grid = {"task.echo_step": list(range(100)), "model.state_size": list(range(1, 101)),
            "train.seed": list(range(10))}  # fmt: skip
    started = time.perf_counter()
    config = config_from_dict({"study": {"search": grid}})
    # Far below what checking each of the grid's points would take (seconds).
    assert config.study.grid_size == 10**5 and time.perf_counter() - started < 1.0
