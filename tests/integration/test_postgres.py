"""The PostgreSQL store (TTA_DATABASE_URL) on a real server: its migrations, and what the API answers when the
database refuses writes, drops the connection or cannot be reached. The Store contract itself runs against
both stores in tests/unit/test_storage.py; two server processes on one database in tests/e2e/test_replicas.py.
"""

from __future__ import annotations

import threading

import psycopg
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from server.api import create_app
from server.errors import ConfigError, StorageFull
from server.settings import Settings
from server.storage import LabelSet, PostgresStore, open_store
from server.storage.postgres import MIGRATION_TABLE, SCHEMA_VERSION, storage_error
from tests.support.apps import wait_ready
from tests.support.images import b64, png_bytes
from tests.support.postgres import PASSWORD, PostgresServer

IMAGE = b64(png_bytes())


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def migrations(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute(f"SELECT version FROM {MIGRATION_TABLE} ORDER BY version")]


@pytest.fixture
def database(postgres_server: PostgresServer) -> str:
    return postgres_server.new_database()


@pytest.fixture
def pg_settings(settings: Settings, database: str) -> Settings:
    return settings.model_copy(update={"database_url": SecretStr(database)})


def test_a_new_database_is_migrated_once_by_replicas_opening_it_together(database):
    stores: list[PostgresStore] = []
    failures: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        start.wait()
        try:
            stores.append(PostgresStore(database))
        except BaseException as exc:  # noqa: BLE001  (reported by the assertion below)
            failures.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert [s.schema_version for s in stores] == [SCHEMA_VERSION] * 4
    assert migrations(database) == list(range(1, SCHEMA_VERSION + 1))  # each applied once
    stores[0].create_label_set(LabelSet("pets", ("cat", "dog")))
    assert stores[3].get_label_set("pets").labels == ("cat", "dog")
    for store in stores:
        store.close()


def test_a_database_from_a_newer_server_is_refused_naming_the_setting_and_not_the_password(database):
    PostgresStore(database).close()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {MIGRATION_TABLE} (version) VALUES ({SCHEMA_VERSION + 1})".encode())
    with pytest.raises(ConfigError, match=r"newer than this server's.*TTA_DATABASE_URL") as refused:
        PostgresStore(database)
    assert PASSWORD not in str(refused.value) and ":***@" in str(refused.value)


def test_a_database_that_cannot_be_reached_stops_start_up_without_the_password(postgres_server, settings):
    wrong = postgres_server.url("postgres", password="not-the-" + PASSWORD)
    with pytest.raises(ConfigError, match="TTA_DATABASE_URL") as refused:
        open_store(settings.model_copy(update={"database_url": SecretStr(wrong)}))
    assert "password authentication failed" in str(refused.value)
    assert PASSWORD not in str(refused.value)
    with pytest.raises(ConfigError, match=r"must be a postgresql://") as other:
        open_store(settings.model_copy(update={"database_url": SecretStr(f"mysql://root:{PASSWORD}@db/tta")}))
    assert PASSWORD not in str(other.value)


def test_a_read_only_database_answers_503_on_writes_while_reads_and_classify_go_on(
    pg_settings, database, postgres_server
):
    with TestClient(create_app(pg_settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        assert c.post("/v1/label-sets", json={"name": "kept", "labels": ["red", "blue"]}).status_code == 201
    # As a hot standby, or a database put in read-only mode for maintenance, refuses writes.
    postgres_server.execute(f"ALTER DATABASE {database_name(database)} SET default_transaction_read_only = on")
    with TestClient(create_app(pg_settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        for r in (
            c.post("/v1/label-sets", json={"name": "new", "labels": ["a", "b"]}),
            c.delete("/v1/label-sets/kept"),
        ):
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "storage_read_only"
            assert "TTA_DATABASE_URL" in r.json()["error"]["message"]
        assert c.get("/v1/label-sets/kept").json()["labels"] == ["red", "blue"]
        answer = c.post("/v1/classify", json={"images": [IMAGE], "label_set": "kept"})
        assert answer.status_code == 200 and answer.json()["results"][0]["label"] in ("red", "blue")


def test_a_lost_connection_is_reopened_and_an_unreachable_database_answers_503_until_it_is_back(
    pg_settings, database, postgres_server
):
    name = database_name(database)
    kill = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    with TestClient(create_app(pg_settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        assert c.post("/v1/label-sets", json={"name": "pets", "labels": ["cat", "dog"]}).status_code == 201

        postgres_server.execute(kill)  # as a database restart or a failover does
        assert c.get("/v1/label-sets/pets").status_code == 200  # the read went on over a new connection

        postgres_server.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false", kill)
        for r in (c.get("/v1/label-sets/pets"), c.post("/v1/classify", json={"images": [IMAGE], "label_set": "pets"})):
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "storage_unavailable"
            assert r.headers["Retry-After"] == "1"
            message = r.json()["error"]["message"]
            assert "TTA_DATABASE_URL" in message and PASSWORD not in message and ":***@" in message
        inline = c.post("/v1/classify", json={"images": [IMAGE], "labels": ["cat", "dog"]})
        assert inline.status_code == 200  # what needs no stored state is served on

        postgres_server.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        assert c.get("/v1/label-sets/pets").json()["labels"] == ["cat", "dog"]  # back without a restart
        assert c.post("/v1/label-sets", json={"name": "more", "labels": ["a", "b"]}).status_code == 201


def test_a_full_database_disk_is_storage_full():
    typed = storage_error(psycopg.errors.DiskFull("could not extend file: No space left on device"), "postgresql://db")
    assert isinstance(typed, StorageFull) and "TTA_DATABASE_URL" in typed.message
