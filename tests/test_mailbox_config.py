"""Mailbox configuration: validation naming the field, the password encrypted at rest."""

from __future__ import annotations

import json
import stat

import pytest
from cryptography.fernet import Fernet

from mailferry.errors import ConfigError, EmailConfigError
from mailferry.mailbox_config import EmailConfigManager, load_fernet, validate_imap_config
from mailferry.models import Settings as SettingsRow
from mailferry.models import TaskSource, User

GOOD = {"host": "imap.example.org", "port": 993, "username": "bob", "password": "s3cret pass",
        "security": "ssl", "folder": "INBOX"}


def with_(**changes):
    cfg = dict(GOOD)
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not ...}


@pytest.mark.parametrize("field", ["host", "port", "username", "password"])
@pytest.mark.parametrize("missing", [..., None, "", "   "])
def test_a_missing_required_field_is_named(field, missing):
    with pytest.raises(EmailConfigError, match=rf"imap_config\.{field}: required"):
        validate_imap_config(with_(**{field: missing}))


@pytest.mark.parametrize("port", [0, 65536, -1, "x", "12.5", 993.5, True])
def test_a_port_outside_1_to_65535_or_not_a_number_is_refused(port):
    with pytest.raises(EmailConfigError, match=r"imap_config\.port"):
        validate_imap_config(with_(port=port))


@pytest.mark.parametrize("port", [1, 143, "993", 65535])
def test_valid_ports(port):
    assert validate_imap_config(with_(port=port)).port == int(port)


def test_security_must_be_ssl_starttls_or_none():
    for choice in ("ssl", "starttls", "none", "SSL"):
        assert validate_imap_config(with_(security=choice)).security == choice.lower()
    with pytest.raises(EmailConfigError, match=r"imap_config\.security: 'tls' must be one of ssl, starttls, none"):
        validate_imap_config(with_(security="tls"))


def test_defaults_and_fetch_options():
    cfg = validate_imap_config(with_(security=..., folder=...))
    assert (cfg.security, cfg.folder, cfg.mark_seen, cfg.move_to) == ("ssl", "INBOX", False, None)
    assert not cfg.changes_server
    with pytest.raises(EmailConfigError, match=r"imap_config\.move_to"):
        validate_imap_config(with_(move_to="INBOX"))
    with pytest.raises(EmailConfigError, match=r"imap_config\.mark_seen"):
        validate_imap_config(with_(mark_seen="yes"))
    with pytest.raises(EmailConfigError, match="imap_config: missing"):
        validate_imap_config(None)


def test_the_password_never_shows_in_repr_or_public_view():
    cfg = validate_imap_config(GOOD)
    assert "s3cret" not in repr(cfg) and "s3cret" not in json.dumps(cfg.public())


def test_the_password_is_encrypted_at_rest_and_read_back(settings):
    user = User.create(email="bob@example.org")
    configs = EmailConfigManager(settings)
    configs.set_imap_config(user, GOOD)

    stored = SettingsRow.get(SettingsRow.user == user).value
    assert stored["imap_config"]["password"].startswith("fernet:")
    assert "s3cret" not in json.dumps(stored)
    assert stored["filter_config"] == {}
    assert configs.get_imap_config(user).password == "s3cret pass"
    assert configs.get_email_config(user)["imap_config"]["password"] == "s3cret pass"
    # another process with the same settings reads it too (same key file)
    assert EmailConfigManager(settings).get_imap_config(user.id).password == "s3cret pass"


def test_the_key_file_is_made_once_with_mode_0600(settings):
    key_file = settings.var_dir / "secret.key"
    assert not key_file.exists()
    first = load_fernet(settings)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    content = key_file.read_text()
    load_fernet(settings)
    assert key_file.read_text() == content
    token = first.encrypt(b"x")
    assert load_fernet(settings).decrypt(token) == b"x"


def test_mailferry_secret_key_is_used_and_a_changed_key_is_a_clear_error(settings):
    user = User.create(email="bob@example.org")
    key_a, key_b = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    EmailConfigManager(settings.replace(secret_key=key_a)).set_imap_config(user, GOOD)
    assert not (settings.var_dir / "secret.key").exists()
    assert EmailConfigManager(settings.replace(secret_key=key_a)).get_imap_config(user).password == "s3cret pass"
    with pytest.raises(EmailConfigError, match="cannot be decrypted.*MAILFERRY_SECRET_KEY"):
        EmailConfigManager(settings.replace(secret_key=key_b)).get_imap_config(user)


def test_an_invalid_secret_key_names_the_setting(settings):
    with pytest.raises(ConfigError, match="MAILFERRY_SECRET_KEY: not a Fernet key"):
        load_fernet(settings.replace(secret_key="too-short"))


def test_update_fetch_config_keeps_the_credentials(settings):
    user = User.create(email="bob@example.org")
    configs = EmailConfigManager(settings)
    configs.set_imap_config(user, GOOD)
    SettingsRow.update(value={**SettingsRow.get().value, "filter_config": {"from": "x"}}).execute()

    updated = configs.update_fetch_config(user, folder="Archive", mark_seen=True)

    assert (updated.folder, updated.mark_seen, updated.password) == ("Archive", True, "s3cret pass")
    assert configs.get_email_config(user)["filter_config"] == {"from": "x"}
    with pytest.raises(EmailConfigError, match=r"imap_config\.password: not a fetch option"):
        configs.update_fetch_config(user, password="other")
    with pytest.raises(EmailConfigError, match=r"imap_config\.move_to"):
        configs.update_fetch_config(user, move_to="Archive")


def test_a_plain_text_password_from_before_encryption_is_read_and_encrypted_on_write(settings):
    user = User.create(email="bob@example.org")
    SettingsRow.create(user=user, key="email_config", value={"imap_config": GOOD, "filter_config": {}})
    configs = EmailConfigManager(settings)
    assert configs.get_imap_config(user).password == "s3cret pass"
    configs.update_fetch_config(user, folder="INBOX")
    assert SettingsRow.get().value["imap_config"]["password"].startswith("fernet:")


def test_detect_email_source(settings):
    configs = EmailConfigManager(settings)
    imap_user = User.create(email="imap@example.org")
    smtp_user = User.create(email="smtp@example.org")
    configs.set_imap_config(imap_user, GOOD)
    assert configs.detect_email_source(imap_user) == TaskSource.IMAP
    assert configs.detect_email_source(smtp_user) == TaskSource.HARAKA
    SettingsRow.update(is_active=False).execute()
    assert configs.detect_email_source(imap_user) == TaskSource.HARAKA
    with pytest.raises(EmailConfigError, match="no IMAP configuration"):
        configs.get_imap_config(imap_user)
