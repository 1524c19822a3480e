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
