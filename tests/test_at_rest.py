"""At rest and on screen: private files, a checked secret key, redacted URLs, escaped mail text."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from cryptography.fernet import Fernet

from mailferry.config import Settings, redact_url
from mailferry.display import escape
from mailferry.errors import ConfigError
from mailferry.mailbox_config import check_secret_key
from tests.pipeline import ROOT


@pytest.mark.parametrize("url, shown", [
    ("amqp://guest:guest@h:5672/%2F", "amqp://guest:***@h:5672/%2F"),
    ("postgresql://u@h/db?password=sekrit&sslmode=require",
     "postgresql://u@h/db?password=***&sslmode=require"),
    ("postgresql://u:pw@h/db?sslpassword=x&application_name=mf",
     "postgresql://u:***@h/db?sslpassword=***&application_name=mf"),
    ("http://a@h/?access_token=t", "http://a@h/?access_token=***"),
    ("sqlite:////var/lib/mailferry.db", "sqlite:////var/lib/mailferry.db"),
])
def test_a_url_is_printed_without_its_secrets(url, shown):
    assert redact_url(url) == shown


def test_mail_text_is_escaped_for_a_terminal():
    assert escape("a\x1b[2Jb\u202ecod.exe\x00\r\n") == "a\\x1b[2Jb\\u202ecod.exe\\x00\\r\\n"
    assert escape("Grüße 👍🏽 日本", keep="\n") == "Grüße 👍🏽 日本"  # ordinary text untouched
    assert escape("line\n\x07", keep="\n") == "line\n\\x07"


def _key(tmp_path, content: bytes, mode: int) -> Settings:
    var = tmp_path / "var"
    var.mkdir(exist_ok=True)
    path = var / "secret.key"
    path.write_bytes(content)
    path.chmod(mode)
    return Settings(var_dir=var)


def test_a_private_valid_key_passes(tmp_path):
    check_secret_key(_key(tmp_path, Fernet.generate_key() + b"\n", 0o600))


@pytest.mark.parametrize("content, mode, says", [
    (b"", 0o600, "empty"),
    (b"\n  \n", 0o600, "empty"),
    (b"not a key", 0o600, "not a Fernet key"),
    (Fernet.generate_key(), 0o644, "chmod 600"),
    (Fernet.generate_key(), 0o640, "chmod 600"),
])
def test_a_bad_key_file_is_refused_at_start_with_what_to_do(tmp_path, content, mode, says):
    with pytest.raises(ConfigError, match=says):
        check_secret_key(_key(tmp_path, content, mode))


def test_a_process_refuses_to_start_on_a_world_readable_key_and_makes_private_files(tmp_path):
    var = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFERRY_")}
    env.update(MAILFERRY_VAR_DIR=str(var), PYTHONPATH=str(ROOT))
    made = subprocess.run([sys.executable, "-m", "mailferry.cli", "users", "add", "a@example.org"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(var.stat().st_mode) == 0o700
    for path in var.iterdir():  # the database, its WAL and shared memory
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    key = var / "secret.key"
    key.write_bytes(Fernet.generate_key())
    key.chmod(0o644)
    refused = subprocess.run([sys.executable, "-m", "mailferry.cli", "users", "list"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "secret.key: mode 0644" in refused.stderr and "chmod 600" in refused.stderr


def test_layers_point_one_way():
    """Nothing that runs in production imports tests/ (bench/ may: a benchmark measures
    against the suites' hand-written sets, e.g. fidelity and understanding), and the shared
    core imports no process package; mailread/ (bytes in, a reading out) imports nothing of the
    broker, the database or the processes."""
    import re
    from devstack.consumers import ROOT
    offenders = []
    for folder in ("mailferry", "mailread", "consumer", "scheduler", "devstack", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if folder != "bench" and re.search(r"^\s*(from|import) tests\b", text, re.M):
                offenders.append(f"{path.relative_to(ROOT)} imports tests")
            if folder == "mailferry" and re.search(r"^\s*(from|import) (consumer|scheduler)\b", text, re.M):
                offenders.append(f"{path.relative_to(ROOT)} imports a process package")
            if folder == "mailread" and re.search(
                    r"^\s*(from|import) (consumer|scheduler|pika|peewee|mailferry\.(db|models|broker|storage))\b", text, re.M):
                offenders.append(f"{path.relative_to(ROOT)} reaches past bytes-in, reading-out")
    assert offenders == []
