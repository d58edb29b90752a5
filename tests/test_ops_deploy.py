"""The deployment files: Prometheus configuration and alert rules (promtool, with unit tests of
the alerts' logic), docker-compose.yml and the Dockerfiles (read, since no Docker engine runs
here), and the Haraka container's config folder and entrypoint, run for real outside a container."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
from pathlib import Path

import pytest
import yaml

from mailferry import broker
from tests.harness.fixtures import require_service
from devstack.haraka import haraka_available, haraka_bin, PLUGIN_DIR
from devstack.ports import free_port
from tests.ops_helpers import DEPLOY, need_binary
from tests.pipeline import ROOT, queue_depth, wait_for

COMPOSE = ROOT / "docker-compose.yml"
ALERTS = DEPLOY / "alerts.yml"


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([need_binary("promtool"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


# -- Prometheus ---------------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules():
    result = _promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in result.stdout


def test_promtool_accepts_the_prometheus_configuration():
    result = _promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_says_how_bad_and_what_it_means():
    rules = _alert_rules()
    assert {"MailferryNoImapFetch", "MailferryTasksFailing", "MailferryDeadLetters",
            "MailferryTasksTimingOut", "MailferryConsumerDown"} <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in rules if f"`{name}`" not in readme]
    assert missing == [], "alerts the README's Operations section does not explain"


def test_alert_rules_select_jobs_that_prometheus_yml_scrapes():
    jobs = {job["job_name"] for job in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]}
    for name, rule in _alert_rules().items():
        for job in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job in jobs, (name, job)


def _annotations(rule: dict, value: str, labels: dict[str, str]) -> dict[str, str]:
    """The rule's annotations as Prometheus renders them (the few template forms used)."""
    out = {}
    for key, text in rule["annotations"].items():
        text = re.sub(r"\{\{ \$value( \| humanize)? \}\}", value, text)
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)
        out[key] = text
    return out


# (alert, input series, eval time, [(labels, $value)] expected firing) — promtool's clock starts
# at 0, so time() at "20m" is 1200.
ALERT_CASES = [
    ("MailferryNoImapFetch",
     {'mailferry_imap_mailboxes{job="mailferry-consumer"}': "3x30",
      'mailferry_last_successful_fetch_timestamp_seconds{job="mailferry-consumer",source="imap"}': "60x30"},
     [("10m", []), ("20m", [({}, "")])]),
    ("MailferryNoImapFetch",  # no mailbox configured: nothing to fetch, nothing to say
     {'mailferry_imap_mailboxes{job="mailferry-consumer"}': "0x30",
      'mailferry_last_successful_fetch_timestamp_seconds{job="mailferry-consumer",source="imap"}': "0x30"},
     [("20m", [])]),
    ("MailferryDeadLetters",
     {'rabbitmq_detailed_queue_messages{job="rabbitmq-queues",vhost="/",queue="mailferry.dead"}': "0 0 2 2 2 2",
      'rabbitmq_detailed_queue_messages{job="rabbitmq-queues",vhost="/",queue="mailferry.inbound"}': "5x5"},
     [("2m", []), ("4m", [({"queue": "mailferry.dead"}, "2")])]),
    ("MailferryConsumerDown",
     {'up{job="mailferry-consumer",instance="consumer:9101"}': "1 1 0 0 0 0 0"},
     [("3m", []), ("5m", [({"job": "mailferry-consumer", "instance": "consumer:9101"}, "0")])]),
    ("MailferryQueueWithoutConsumer",
     {'rabbitmq_detailed_queue_consumers{job="rabbitmq-queues",vhost="/",queue="mailferry.inbound"}': "0x10",
      'rabbitmq_detailed_queue_consumers{job="rabbitmq-queues",vhost="/",queue="mailferry.dead"}': "0x10",
      'rabbitmq_detailed_queue_consumers{job="rabbitmq-queues",vhost="/",queue="mailferry.imap_fetch"}': "2x10"},
     [("7m", [({"queue": "mailferry.inbound"}, "0")])]),
    ("MailferryQueueWithoutConsumer",  # one host of several: its own inbound queue
     {'rabbitmq_detailed_queue_consumers{job="rabbitmq-queues",vhost="/",queue="mailferry.inbound.mx-2"}': "0x10",
      'rabbitmq_detailed_queue_consumers{job="rabbitmq-queues",vhost="/",queue="mailferry.inbound.mx-1"}': "1x10"},
     [("7m", [({"queue": "mailferry.inbound.mx-2"}, "0")])]),
    ("MailferryInboundBacklog",
     {'rabbitmq_detailed_queue_messages_ready{job="rabbitmq-queues",vhost="/",queue="mailferry.inbound.mx-1"}': "5000x20",
      'rabbitmq_detailed_queue_messages_ready{job="rabbitmq-queues",vhost="/",queue="mailferry.inbound"}': "10x20"},
     [("5m", []), ("12m", [({"queue": "mailferry.inbound.mx-1"}, "5000")])]),
    ("MailferryTasksFailing",
     {'mailferry_task_transitions_total{job="mailferry-consumer",source="IMAP_EMAIL_FETCH",status="FAILED"}': "0 1 2 3 4 5",
      'mailferry_task_transitions_total{job="mailferry-consumer",source="IMAP_EMAIL_FETCH",status="COMPLETED"}': "0+10x5"},
     [("1m", []), ("5m", [({}, "5")])]),
    ("MailferryTasksTimingOut",
     {'mailferry_task_timeouts_total{job="mailferry-consumer",reason="watchdog"}': "0 0 1 1",
      'mailferry_task_timeouts_total{job="mailferry-consumer",reason="expired"}': "0 5 9 9"},
     [("1m", []), ("3m", [({}, "")])]),
    ("MailferryTasksStuckPastTimeout",
     {'mailferry_tasks_running_past_timeout{job="mailferry-consumer"}': "1x30",
      'mailferry_tasks_running_past_timeout{job="mailferry-scheduler"}': "1x30"},
     [("10m", []), ("20m", [({}, "1")])]),
    ("MailferryNoScheduler",  # the lease ran out at 30 s and nobody renewed it
     {'mailferry_scheduler_lease_expires_timestamp_seconds{job="mailferry-scheduler"}': "30x10"},
     [("2m", []), ("5m", [({}, "")])]),
    ("MailferryNoScheduler",  # renewed all along
     {'mailferry_scheduler_lease_expires_timestamp_seconds{job="mailferry-scheduler"}': "30+60x10"},
     [("9m", [])]),
    ("MailferrySchedulerNotTicking",
     {'mailferry_scheduler_lease_held{job="mailferry-scheduler",instance="a"}': "1x20",
      'mailferry_scheduler_lease_held{job="mailferry-scheduler",instance="b"}': "0x20",
      'mailferry_scheduler_last_tick_timestamp_seconds{job="mailferry-scheduler",instance="a"}': "60x20"},
     [("5m", []), ("12m", [({}, "")])]),
    ("MailferryDatabaseUnreachable",
     {'mailferry_database_up{job="mailferry-scheduler",instance="s:9102"}': "1 0 0 0 0"},
     [("4m", [({"job": "mailferry-scheduler", "instance": "s:9102"}, "0")])]),
]


def test_alerts_fire_when_and_only_when_they_should(tmp_path):
    """promtool's rule unit tests, generated from ALERT_CASES (annotations rendered here)."""
    rules = _alert_rules()
    tests = []
    for alert, series, checks in ALERT_CASES:
        rule = rules[alert]
        alert_tests = []
        for at, firing in checks:
            expected = []
            for labels, value in firing:
                exp = {"exp_labels": {**labels, **rule["labels"]}}
                if rule.get("annotations"):
                    exp["exp_annotations"] = _annotations(rule, value, labels)
                expected.append(exp)
            alert_tests.append({"eval_time": at, "alertname": alert, "exp_alerts": expected})
        tests.append({"interval": "1m",
                      "input_series": [{"series": s, "values": v} for s, v in series.items()],
                      "alert_rule_test": alert_tests})
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m",
                                    "tests": tests}, sort_keys=False))
    result = _promtool("test", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr


# -- docker-compose.yml and the images ---------------------------------------------------------


def test_compose_file_names_every_service_and_wires_them():
    compose = _compose()
    services = compose["services"]
    assert {"rabbitmq", "postgres", "haraka", "consumer", "scheduler", "prometheus"} <= set(services)

    rabbit = services["rabbitmq"]
    assert re.fullmatch(r"rabbitmq:4[\w.-]*-management", rabbit["image"])
    assert rabbit["environment"]["RABBITMQ_DEFAULT_USER"] not in ("", "guest")
    assert "guest" not in rabbit["environment"]["RABBITMQ_DEFAULT_PASS"]
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins
    assert any(v.startswith("./deploy/rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins")
               for v in rabbit["volumes"])

    for name in ("consumer", "scheduler"):
        env = services[name]["environment"]
        assert env["MAILFERRY_QUEUE_TYPE"] == "quorum", name
        assert "guest" not in env["MAILFERRY_AMQP_URL"] and "@rabbitmq:5672" in env["MAILFERRY_AMQP_URL"]
        assert env["MAILFERRY_DATABASE_URL"].startswith("postgresql://")
        assert env["MAILFERRY_METRICS_HOST"] == "0.0.0.0"
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile.python"
        assert "readyz" in " ".join(services[name]["healthcheck"]["test"])
    assert services["consumer"]["command"] == ["mailferry", "consumer"]
    assert services["scheduler"]["command"] == ["mailferry", "scheduler"]
    assert services["haraka"]["build"]["dockerfile"] == "deploy/Dockerfile.haraka"

    # Haraka and the consumer (and the scheduler's spool sweep) share one spool volume, mounted
    # where MAILFERRY_SPOOL_DIR says.
    def spool_mount(name):
        spool_dir = services[name]["environment"]["MAILFERRY_SPOOL_DIR"]
        mounts = [v.split(":")[0] for v in services[name]["volumes"] if v.split(":")[1] == spool_dir]
        assert len(mounts) == 1, name
        return mounts[0]
    assert spool_mount("haraka") == spool_mount("consumer") == spool_mount("scheduler") == "spool"
    assert "spool" in compose["volumes"]

    # Prometheus scrapes every part through deploy/prometheus.yml, with the rules beside it.
    prom = services["prometheus"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in prom["volumes"]
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    consumer_port = services["consumer"]["environment"]["MAILFERRY_CONSUMER_METRICS_PORT"]
    scheduler_port = services["scheduler"]["environment"]["MAILFERRY_SCHEDULER_METRICS_PORT"]
    assert {f"consumer:{consumer_port}", f"scheduler:{scheduler_port}", "rabbitmq:15692",
            "haraka:2525", "postgres-exporter:9187"} <= targets
    for target in targets:
        host = target.split(":")[0]
        assert host == "localhost" or host in services, target


def test_files_the_compose_file_and_dockerfiles_name_exist():
    compose = _compose()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
        build = service.get("build")
        if build:
            dockerfile = ROOT / build["context"] / build["dockerfile"]
            assert dockerfile.is_file(), name
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY ") and "--from=" not in line:
                    for source in line.split()[1:-1]:
                        assert (ROOT / source).exists(), (dockerfile.name, source)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "**/node_modules" in ignored and "var" in ignored


def test_both_images_share_the_spool_owner_and_the_python_image_runs_every_command():
    python = (DEPLOY / "Dockerfile.python").read_text()
    haraka = (DEPLOY / "Dockerfile.haraka").read_text()
    uids = [set(re.findall(r"--uid (\d+)", text)) for text in (python, haraka)]
    assert uids[0] == uids[1] and len(uids[0]) == 1
    assert "USER mailferry" in python and "USER mailferry" in haraka
    assert 'CMD ["mailferry", "consumer"]' in python
    assert re.search(r"FROM python:3\.1[1-9]", python)
    haraka_version = re.search(r"ARG HARAKA_VERSION=(\S+)", haraka).group(1)
    lock = (PLUGIN_DIR / "package-lock.json").read_text()
    assert f'"node_modules/Haraka": {{\n      "version": "{haraka_version}"' in lock, \
        "the image's Haraka is the one the plugin is tested with"


# -- the Haraka container's configuration, run outside a container ------------------------------


def _smtp_banner_ok(port: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=2) as smtp:
            return smtp.noop()[0] == 250
    except OSError:
        return False


def test_the_haraka_image_config_accepts_mail_for_its_domains_and_spools_it(broker_settings, tmp_path):
    if not haraka_available():
        require_service("Haraka", f"run `npm ci` in {PLUGIN_DIR} (make install does)")
    settings = broker_settings
    broker.setup_topology(settings)  # as the consumer would have, before Haraka starts
    root = tmp_path / "etc-haraka"
    shutil.copytree(DEPLOY / "haraka" / "config", root / "config")
    (root / "node_modules").mkdir()
    (root / "node_modules" / "haraka-plugin-mailferry").symlink_to(PLUGIN_DIR.resolve())
    spool = tmp_path / "spool"
    port = free_port()
    env = {**os.environ, "HARAKA_DIR": str(root), "HARAKA_BIN": str(haraka_bin()),
           "MAILFERRY_AMQP_URL": settings.amqp_url, "MAILFERRY_SPOOL_DIR": str(spool),
           "MAILFERRY_SMTP_DOMAINS": "example.org, example.net",
           "MAILFERRY_SMTP_LISTEN": f"127.0.0.1:{port}"}
    log_path = tmp_path / "haraka.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["sh", str(DEPLOY / "haraka" / "entrypoint.sh")], cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or _smtp_banner_ok(port), timeout=30,
                 message="Haraka's banner")
        assert proc.poll() is None, log_path.read_text()
        wait_for(lambda: "connected to RabbitMQ" in log_path.read_text(errors="replace"),
                 timeout=15, message="the plugin's broker connection")
        assert (root / "config" / "host_list").read_text().split() == ["example.org", "example.net"]
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            code, _ = smtp.docmd("MAIL FROM:<a@sender.test>")
            assert code == 250
            code, _ = smtp.docmd("RCPT TO:<x@elsewhere.test>")
            assert code >= 500  # not one of our domains
            smtp.rset()
            failures = smtp.sendmail("a@sender.test", ["bob@example.org"],
                                     b"Subject: hello\r\nMessage-ID: <h1@sender.test>\r\n\r\nhi\r\n")
            assert failures == {}
        assert queue_depth(settings.amqp_url, broker.INBOUND) == 1
        assert [p.suffix for p in (spool / "incoming").iterdir()] == [".seg"]  # its record
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Haraka stops on SIGINT (SIGTERM as pid 1)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_the_haraka_entrypoint_refuses_to_start_without_a_broker_url(tmp_path):
    root = tmp_path / "etc-haraka"
    shutil.copytree(DEPLOY / "haraka" / "config", root / "config")
    env = {k: v for k, v in os.environ.items() if k != "MAILFERRY_AMQP_URL"}
    env.update(HARAKA_DIR=str(root), HARAKA_BIN="/bin/false", MAILFERRY_SPOOL_DIR=str(tmp_path / "s"))
    result = subprocess.run(["sh", str(DEPLOY / "haraka" / "entrypoint.sh")], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode != 0
    assert "MAILFERRY_AMQP_URL must be set" in result.stderr


@pytest.mark.parametrize("domains, host_list, regex", [
    ("", ["localhost"], [".*"]),
    ("a.example, b.example c.example", ["a.example", "b.example", "c.example"], []),
])
def test_the_haraka_entrypoint_writes_its_settings(tmp_path, domains, host_list, regex):
    root = tmp_path / "etc-haraka"
    shutil.copytree(DEPLOY / "haraka" / "config", root / "config")
    env = {**os.environ, "HARAKA_DIR": str(root), "HARAKA_BIN": "/bin/true",
           "MAILFERRY_AMQP_URL": "amqp://u:p@rabbitmq:5672/%2F", "MAILFERRY_SMTP_DOMAINS": domains,
           "MAILFERRY_SPOOL_DIR": str(tmp_path / "spool")}
    result = subprocess.run(["sh", str(DEPLOY / "haraka" / "entrypoint.sh")], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    config = root / "config"
    assert config.joinpath("host_list").read_text().split() == host_list
    assert config.joinpath("host_list_regex").read_text().split() == regex
    assert "url=amqp://u:p@rabbitmq:5672/%2F" in config.joinpath("mailferry.ini").read_text()
    assert f"spool_dir={tmp_path / 'spool'}" in config.joinpath("mailferry.ini").read_text()
    assert config.joinpath("smtp.ini").read_text().count("listen=") == 1
    assert "listen=0.0.0.0:2525" in config.joinpath("smtp.ini").read_text()
    assert (tmp_path / "spool" / "incoming").is_dir() and (tmp_path / "spool" / "failed").is_dir()
    assert "routing_key=inbound\n" in config.joinpath("mailferry.ini").read_text()  # one host


def test_the_haraka_entrypoint_publishes_to_its_hosts_queue_when_it_is_one_of_several(tmp_path):
    root = tmp_path / "etc-haraka"
    shutil.copytree(DEPLOY / "haraka" / "config", root / "config")
    env = {**os.environ, "HARAKA_DIR": str(root), "HARAKA_BIN": "/bin/true", "MAILFERRY_NODE": "mx-2",
           "MAILFERRY_AMQP_URL": "amqp://u:p@rabbit-1:5672/%2F,amqp://u:p@rabbit-2:5672/%2F",
           "MAILFERRY_SPOOL_DIR": str(tmp_path / "spool")}
    result = subprocess.run(["sh", str(DEPLOY / "haraka" / "entrypoint.sh")], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    ini = (root / "config" / "mailferry.ini").read_text()
    assert "routing_key=inbound.mx-2\n" in ini
    assert "url=amqp://u:p@rabbit-1:5672/%2F,amqp://u:p@rabbit-2:5672/%2F\n" in ini


def test_the_cluster_example_gives_each_host_its_own_spool_node_name_and_shared_engines():
    compose = yaml.safe_load((DEPLOY / "compose.cluster.yml").read_text())
    services = compose["services"]
    nodes = "\n".join(line for line in (DEPLOY / "rabbitmq" / "30-cluster.conf").read_text().splitlines()
                      if not line.startswith("#"))
    rabbits = sorted(name for name in services if name.startswith("rabbit-"))
    assert rabbits == ["rabbit-1", "rabbit-2", "rabbit-3"]
    for name in rabbits:
        assert services[name]["hostname"] == name and f"rabbit@{name}" in nodes
        assert "./rabbitmq/30-cluster.conf:/etc/rabbitmq/conf.d/30-cluster.conf:ro" in services[name]["volumes"]
    for host in ("a", "b"):
        spool = f"spool-{host}"
        for role in ("haraka", "consumer", "scheduler"):
            service = services[f"{role}-{host}"]
            assert service["environment"]["MAILFERRY_NODE"] == host, (role, host)
            assert [v.split(":")[0] for v in service["volumes"]] == [spool], (role, host)
            assert service["environment"]["MAILFERRY_SPOOL_DIR"] == "/var/spool/mailferry"
        for role in ("consumer", "scheduler", "relay", "webhooks", "api"):
            env = services[f"{role}-{host}"]["environment"]
            assert env["MAILFERRY_NODE"] == host
            assert [url.split("@")[1].split(":")[0] for url in env["MAILFERRY_AMQP_URL"].split(",")] == rabbits
            assert env["MAILFERRY_QUEUE_TYPE"] == "quorum"
            assert env["MAILFERRY_DATABASE_URL"].startswith("postgresql://") and "@postgres:" in env["MAILFERRY_DATABASE_URL"]
            assert env["MAILFERRY_STORAGE_URL"].startswith("s3://")
            assert env["MAILFERRY_S3_ENDPOINT"].split("//")[1].split(":")[0] in services
        # a host's spool is no other host's
        other = "b" if host == "a" else "a"
        assert not any(v.startswith(f"spool-{host}:") for name, s in services.items()
                       if name.endswith(f"-{other}") for v in s.get("volumes", []))
    # The settings a host's processes start with pass Mailferry's own checks.
    from mailferry.config import load_settings
    for name in ("consumer-a", "relay-b"):
        env = {k: v.replace("${RABBITMQ_PASSWORD}", "p") for k, v in services[name]["environment"].items()}
        settings = load_settings({k: str(v) for k, v in env.items()})
        assert len(settings.amqp_urls) == 3 and settings.node == name[-1]
    for path in ("rabbitmq/enabled_plugins", "rabbitmq/20-mailferry.conf", "Dockerfile.python", "Dockerfile.haraka"):
        assert (DEPLOY / path).exists(), path
