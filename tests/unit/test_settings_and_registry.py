"""Configuration from environment and CLI, secrets masking, and method registration rules."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from adapters import get_method, method_names
from adapters.base import Method, OptionsError, register
from server.settings import Settings, build_parser, settings_from_args


def test_env_prefix_and_cli_override(monkeypatch):
    monkeypatch.setenv("TTA_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("TTA_PORT", "9001")
    monkeypatch.setenv("TTA_MODEL", "ViT-B-32")
    s = settings_from_args(["--port", "9002", "--precision", "bf16", "--max-batch-delay-ms", "2.5"])
    assert s.max_batch_size == 7  # from the environment
    assert s.port == 9002  # the flag wins
    assert s.precision == "bf16" and s.max_batch_delay_ms == 2.5 and s.model == "ViT-B-32"


def test_every_setting_has_a_flag():
    flags = {a.dest for a in build_parser()._actions}
    assert set(Settings.model_fields) <= flags


def test_invalid_values_are_rejected():
    with pytest.raises(ValueError, match="device"):
        Settings(device="gpu0", _env_file=None)
    with pytest.raises(SystemExit):
        settings_from_args(["--precision", "fp8"])


def test_secrets_are_masked():
    masked = Settings(hf_token="hf_secret", _env_file=None).masked()
    assert masked["hf_token"] == "***"
    assert "hf_secret" not in str(masked)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://tta:s3cret@db:5432/tta", "postgresql://tta:***@db:5432/tta"),
        ("postgresql://tta:p@ss:w0rd@db/tta", "postgresql://tta:***@db/tta"),  # an unescaped '@' or ':' in it
        ("postgres://tta@db/tta?sslmode=require", "postgres://tta@db/tta?sslmode=require"),  # no password
        ("postgresql://db/tta?user=tta&password=s3cret", "postgresql://db/tta?user=tta&password=***"),
        ("postgresql://tta:s3cret@db1:5432,db2:5432/tta", "postgresql://tta:***@db1:5432,db2:5432/tta"),
    ],
)
def test_the_database_url_is_logged_without_its_password(url, shown):
    settings = settings_from_args(["--database-url", url])
    assert settings.database_url is not None and settings.database_url.get_secret_value() == url
    assert settings.masked()["database_url"] == shown
    assert url not in repr(settings) and "s3cret" not in str(settings.masked())


def test_a_blank_database_url_keeps_sqlite(monkeypatch):
    monkeypatch.setenv("TTA_DATABASE_URL", " ")
    assert Settings(_env_file=None).database_url is None


def test_registry_holds_zero_shot_with_no_options():
    assert "zero_shot" in method_names()
    method = get_method("zero_shot")
    assert method.parse_options(None) == method.parse_options({})
    with pytest.raises(OptionsError, match="steps"):
        method.parse_options({"steps": 3})


def test_registration_is_validated_at_import():
    class NoOptions(Method):
        name = "bad_one"
        summary = "x"

        def predict(self, *a):
            return None

    with pytest.raises(TypeError, match="Options"):
        register(NoOptions)

    class UpperName(NoOptions):
        name = "Bad"

        @dataclass(frozen=True)
        class Options:
            pass

    with pytest.raises(TypeError, match="lowercase"):
        register(UpperName)

    class Duplicate(UpperName):
        name = "zero_shot"

    with pytest.raises(TypeError, match="twice"):
        register(Duplicate)

    class NoDefault(UpperName):
        name = "no_default"

        @dataclass(frozen=True)
        class Options:
            lr: float

    with pytest.raises(TypeError, match="default"):
        register(NoDefault)
