"""Docker (testcontainers) alternatives to the native servers, used only when a Docker engine
answers. On the project's machines it does not (the client is installed, no engine behind it),
so the fixtures fall through to the native servers in rabbitmq.py / postgres.py.

The containers offer the same small interface as the native servers:
``RabbitMQContainerService``: ``amqp_url``, ``management_url``, ``stop()``;
``PostgresContainerService``: ``url``, ``create_database(name) -> url``, ``drop_database``,
``stop()``.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import time
from urllib.parse import quote

from .postgres import PostgresAdmin

RABBITMQ_IMAGE = "rabbitmq:3.10-management"
POSTGRES_IMAGE = "postgres:15"


@functools.lru_cache(maxsize=1)
def docker_available(timeout: float = 3.0) -> bool:
    """True when the docker client exists AND an engine answers ``docker info`` in time."""
    docker = shutil.which("docker")
    if not docker:
        return False
    try:
        proc = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (subprocess.TimeoutExpired, OSError):
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


class RabbitMQContainerService:
    """RabbitMQ with the management plugin in a container (testcontainers)."""

    can_restart = False

    def __init__(self, image: str = RABBITMQ_IMAGE):
        try:
            from testcontainers.community.rabbitmq import RabbitMqContainer
        except ImportError:  # testcontainers < 4.14
            from testcontainers.rabbitmq import RabbitMqContainer

        self._container = RabbitMqContainer(image)
        self._container.with_exposed_ports(15672)
        # Classic queues v2, as the native server (rabbitmq.py) and RabbitMQ 4 in
        # docker-compose.yml: the 3.10 image still creates v1 unless told.
        self._container.with_env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                                 "-rabbit classic_queue_default_version 2")
        self.username = self._container.username
        self.password = self._container.password

    def start(self) -> "RabbitMQContainerService":
        self._container.start()
        host = self._container.get_container_host_ip()
        self.host = host
        self.amqp_port = int(self._container.get_exposed_port(self._container.port))
        self.management_port = int(self._container.get_exposed_port(15672))
        self._wait_management()
        return self

    def _wait_management(self, timeout: float = 60) -> None:
        from .rabbitmq import management_request

        deadline = time.monotonic() + timeout
        while True:
            try:
                management_request(self.management_url, "GET", "/api/overview",
                                   username=self.username, password=self.password, timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    @property
    def amqp_url(self) -> str:
        return self.amqp_url_for("/")

    def amqp_url_for(self, vhost: str) -> str:
        return (f"amqp://{quote(self.username, safe='')}:{quote(self.password, safe='')}"
                f"@{self.host}:{self.amqp_port}/{quote(vhost, safe='')}")

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.management_port}"

    def stop(self) -> None:
        self._container.stop()


class PostgresContainerService(PostgresAdmin):
    """PostgreSQL in a container (testcontainers)."""

    def __init__(self, image: str = POSTGRES_IMAGE):
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers < 4.14
            from testcontainers.postgres import PostgresContainer

        self._container = PostgresContainer(image, driver=None)

    def start(self) -> "PostgresContainerService":
        self._container.start()
        return self

    @property
    def url(self) -> str:
        return self._container.get_connection_url()

    def url_for(self, dbname: str) -> str:
        return self.url.rsplit("/", 1)[0] + "/" + dbname

    def stop(self) -> None:
        self._container.stop()
