"""mailferry.config: defaults, environment, TOML, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailferry.config import Settings, load_settings
from mailferry.errors import ConfigError


def test_defaults_run_on_one_machine():
    settings = load_settings({})
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.resolved_database_url.endswith("var/mailferry.db")
    assert settings.resolved_spool_dir == Path("var/spool").resolve()
    assert settings.queue_type == "classic"


def test_environment_overrides_toml(tmp_path):
    config = tmp_path / "mailferry.toml"
    config.write_text('prefetch = 7\nqueue_type = "quorum"\n')
    settings = load_settings({"MAILFERRY_CONFIG": str(config), "MAILFERRY_PREFETCH": "9"})
    assert settings.prefetch == 9
    assert settings.queue_type == "quorum"


@pytest.mark.parametrize("env,message", [
    ({"MAILFERRY_PREFETCH": "many"}, "MAILFERRY_PREFETCH='many': expected a whole number"),
    ({"MAILFERRY_PREFETCH": "0"}, "MAILFERRY_PREFETCH=0: must be between 1 and 10000"),
    ({"MAILFERRY_QUEUE_TYPE": "lazy"}, "MAILFERRY_QUEUE_TYPE='lazy': must be one of classic, quorum"),
    ({"MAILFERRY_DATABASE_URL": "mysql://u:secret@h/db"}, "must start with sqlite://, postgresql://"),
    ({"MAILFERRY_AMQP_URL": "http://x"}, "MAILFERRY_AMQP_URL='http://x': must start with amqp://"),
])
def test_invalid_values_name_the_variable_and_what_it_accepts(env, message):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert message in str(info.value)


def test_passwords_are_not_repeated_in_errors():
    with pytest.raises(ConfigError) as info:
        load_settings({"MAILFERRY_DATABASE_URL": "mysql://u:secret@h/db"})
    assert "secret" not in str(info.value)


def test_unknown_toml_keys_and_bad_toml_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("prefetch = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({"MAILFERRY_CONFIG": str(bad)})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("prefetsh = 3\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings({"MAILFERRY_CONFIG": str(unknown)})


def test_settings_are_frozen():
    with pytest.raises(Exception):
        Settings().prefetch = 3  # type: ignore[misc]


def test_invalid_configuration_stops_the_cli_with_one_line(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "mailferry.cli", "users", "list"],
                            env={"MAILFERRY_PREFETCH": "-1", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, cwd=tmp_path,
                            )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mailferry: configuration error: MAILFERRY_PREFETCH=-1: must be between 1 and 10000 "
        "(messages a consumer holds unacked; a batch per commit is a quarter of it"
        ", and at most 16 MB of mail)"]


def test_a_cluster_of_brokers_needs_quorum_queues_and_each_node_is_checked():
    nodes = "amqp://u:secret@a:5672/%2F, amqp://u:secret@b:5672/%2F,amqp://u:secret@c:5672/%2F"
    pg = {"MAILFERRY_DATABASE_URL": "postgresql://u@db/mailferry"}
    with pytest.raises(ConfigError) as refused:
        load_settings({"MAILFERRY_AMQP_URL": nodes, **pg})
    assert "names 3 RabbitMQ nodes" in str(refused.value) and "QUEUE_TYPE=quorum" in str(refused.value)
    settings = load_settings({"MAILFERRY_AMQP_URL": nodes, "MAILFERRY_QUEUE_TYPE": "quorum", **pg})
    assert settings.amqp_urls == ["amqp://u:secret@a:5672/%2F", "amqp://u:secret@b:5672/%2F",
                                  "amqp://u:secret@c:5672/%2F"]
    with pytest.raises(ConfigError, match="http://b"):
        load_settings({"MAILFERRY_AMQP_URL": "amqp://a/%2F,http://b/", "MAILFERRY_QUEUE_TYPE": "quorum", **pg})
    from mailferry.config import redact_url
    assert redact_url(nodes.replace(" ", "")) == ",".join(f"amqp://u:***@{h}:5672/%2F" for h in "abc")


@pytest.mark.parametrize("env", [{"MAILFERRY_NODE": "mx-1"},
                                 {"MAILFERRY_AMQP_URL": "amqp://a/%2F,amqp://b/%2F", "MAILFERRY_QUEUE_TYPE": "quorum"}])
def test_more_than_one_host_on_sqlite_is_refused_in_one_line(env):
    with pytest.raises(ConfigError) as refused:
        load_settings(env)
    message = str(refused.value)
    assert "SQLite is a file on one host" in message and "\n" not in message
    assert load_settings({**env, "MAILFERRY_DATABASE_URL": "postgresql://u@db/m"}).resolved_database_url.startswith("postgresql")
