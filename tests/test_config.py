"""Configuration is loaded once from defaults, file, environment and command line, and a bad value is
refused with its key, the value and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from node.cli import main
from node.config import Config, load_config
from node.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "petriage.yaml"
    path.write_text(text)
    return path


def test_config_yaml_in_the_repository_equals_the_embedded_defaults():
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert shipped == Config().model_dump(mode="json")


def test_the_config_contract_keys_exist():
    cfg = Config()
    assert (cfg.node.ae_title, cfg.node.host, cfg.node.port, cfg.node.allowed_calling_aets) == \
        ("PETRIAGE", "0.0.0.0", 11112, [])
    assert (cfg.study.quiet_seconds, cfg.study.max_wait_seconds) == (20.0, 900.0)
    assert (str(cfg.model.bundle), cfg.model.device) == ("models/demo", "auto")
    assert cfg.destinations[0].ae_title == "ORTHANC" and cfg.destinations[0].port == 4242


def test_every_invalid_value_is_reported_with_key_value_and_expectation(tmp_path):
    path = write(tmp_path, "node:\n  port: 70000\n  ae_title: WAY_TOO_LONG_AE_TITLE\nmodel:\n  device: tpu\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    text = str(exc.value)
    assert str(path) in text
    assert "node.port: got 70000; expected less than or equal to 65535" in text
    assert "node.ae_title: got 'WAY_TOO_LONG_AE_TITLE'" in text and "1-16 characters" in text
    assert "model.device: got 'tpu'; expected 'auto', 'cpu' or 'cuda'" in text


def test_a_store_url_for_another_database_is_refused_and_a_postgresql_one_gets_its_driver(tmp_path):
    with pytest.raises(ConfigError, match=r"store.url: got 'mysql://db/petriage'; expected a sqlite:///PATH"):
        load_config(write(tmp_path, "store:\n  url: mysql://db/petriage\n"), environ={})
    cfg = load_config(write(tmp_path, "store:\n  url: postgresql://petriage@db:5432/petriage\n"), environ={})
    assert cfg.store.url == "postgresql+psycopg://petriage@db:5432/petriage"


def test_a_misspelt_key_is_refused_rather_than_ignored(tmp_path):
    with pytest.raises(ConfigError, match=r"study.quiet_second: unknown setting"):
        load_config(write(tmp_path, "study:\n  quiet_second: 5\n"), environ={})


def test_max_wait_shorter_than_quiet_period_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="max_wait_seconds"):
        load_config(write(tmp_path, "study: {quiet_seconds: 60, max_wait_seconds: 30}\n"), environ={})


def test_duplicate_destination_names_are_refused(tmp_path):
    text = ("destinations:\n  - {name: pacs, ae_title: A, host: h, port: 1}\n"
            "  - {name: pacs, ae_title: B, host: h, port: 2}\n")
    with pytest.raises(ConfigError, match="repeated: pacs"):
        load_config(write(tmp_path, text), environ={})


def test_environment_overrides_the_file_and_command_line_overrides_the_environment(tmp_path):
    path = write(tmp_path, "node:\n  port: 2000\n  ae_title: FROMFILE\n")
    env = {"PETRIAGE__NODE__PORT": "3000", "PETRIAGE__NODE__ALLOWED_CALLING_AETS": "[CT1, CT2]"}
    cfg = load_config(path, environ=env, overrides=["node.port=4000"])
    assert cfg.node.port == 4000
    assert cfg.node.ae_title == "FROMFILE"
    assert cfg.node.allowed_calling_aets == ["CT1", "CT2"]
    assert load_config(path, environ=env).node.port == 3000


def test_petriage_config_variable_chooses_the_file(tmp_path):
    path = write(tmp_path, "node:\n  ae_title: VIAENV\n")
    assert load_config(environ={"PETRIAGE_CONFIG": str(path)}).node.ae_title == "VIAENV"
    assert load_config(environ={}).node.ae_title == "PETRIAGE"


def test_relative_paths_in_a_file_are_relative_to_that_file(tmp_path):
    path = write(tmp_path, "storage:\n  root: data\nmodel:\n  bundle: /opt/bundle\n")
    cfg = load_config(path, environ={})
    assert cfg.storage.root == (tmp_path / "data").resolve()
    assert cfg.model.bundle == Path("/opt/bundle")


def test_unreadable_or_malformed_files_give_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "node: [unclosed\n"), environ={})
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), environ={})


@given(st.integers(min_value=-10**6, max_value=10**6))
def test_a_port_is_accepted_exactly_when_it_is_between_1_and_65535(port):
    try:
        cfg = load_config(environ={}, overrides=[f"node.port={port}"])
    except ConfigError as exc:
        assert not 1 <= port <= 65535
        assert f"node.port: got {port}" in str(exc)
    else:
        assert 1 <= port <= 65535 and cfg.node.port == port


def test_config_check_prints_the_effective_config_and_exits_0(tmp_path, capsys):
    path = write(tmp_path, "node:\n  port: 104\n")
    assert main(["config", "check", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["node"]["port"] == 104 and printed["node"]["ae_title"] == "PETRIAGE"


def test_config_check_exits_2_naming_the_bad_key(tmp_path, capsys):
    path = write(tmp_path, "node:\n  port: -5\n")
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "node.port: got -5" in err and "Traceback" not in err


def test_global_config_option_and_set_reach_config_check(tmp_path, capsys):
    path = write(tmp_path, "node:\n  ae_title: GLOBAL\n")
    assert main(["--config", str(path), "--set", "node.port=5555", "config", "check"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["node"]["ae_title"], printed["node"]["port"]) == ("GLOBAL", 5555)
    assert main(["--set", "nodeport", "config", "check"]) == 2
