"""Shared fixtures: a real Mosquitto per session, sockets on 127.0.0.1, custom integrations.

``meshtastic`` is imported here, at module level, because it starts its global
``publishing`` thread at import; importing it inside a test would make PHCC's
thread-leak check fail that test (``shared/reference/home-assistant.md`` §7.4).
The module-level import of the integration's ``const`` makes the project's
``custom_components`` package win over PHCC's own (§7.1).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import meshtastic  # starts its import-time thread before any test
import meshtastic.tcp_interface  # noqa: F401
import pytest

from custom_components.mqtt_bridge.const import DOMAIN  # noqa: F401
from devkit import fixtures
from devkit.meshsim import SimulatedNode, default_profile
from devkit.mosquitto import Mosquitto
from devkit.rabbitmq import RabbitMQ, rabbitmq_broker

# The session broker and its per-test check, shared with tests_engine/.
mosquitto_session = fixtures.mosquitto_session
mosquitto = fixtures.mosquitto


@pytest.fixture(autouse=True)
def _sockets(socket_enabled: None) -> None:
    """Allow AF_INET sockets; PHCC still limits connect() to 127.0.0.1."""


@pytest.fixture(autouse=True)
def _custom_integrations(enable_custom_integrations: None) -> None:
    """Let HA load integrations from custom_components."""


@pytest.fixture
def private_mosquitto() -> Iterator[Mosquitto]:
    """A broker of the test's own, for tests that kill or restart it."""
    broker = Mosquitto()
    broker.start()
    yield broker
    broker.cleanup()


@pytest.fixture
def password_broker() -> Iterator[Mosquitto]:
    """A Mosquitto that accepts only user ``u`` with password ``p``."""
    broker = Mosquitto(users={"u": "p"})
    broker.start()
    yield broker
    broker.cleanup()


@pytest.fixture
def tls_broker() -> Iterator[Mosquitto]:
    """An anonymous Mosquitto with a self-signed TLS listener on ``tls_port``."""
    broker = Mosquitto(tls=True)
    broker.start()
    yield broker
    broker.cleanup()


@pytest.fixture
async def node(mosquitto: Mosquitto) -> AsyncIterator[SimulatedNode]:
    """A simulated node on TCP whose MQTT settings name the session broker."""
    sim = SimulatedNode(default_profile(mqtt_address=f"127.0.0.1:{mosquitto.port}"))
    await sim.start_tcp()
    yield sim
    await sim.stop()


@pytest.fixture(scope="session")
def rabbitmq_session() -> Iterator[RabbitMQ]:
    """One RabbitMQ (MQTT 3.1.1 only, anonymous) for the session, started on first use.

    Fails, never skips, when RabbitMQ is not installed (scripts/setup installs it).
    """
    yield from rabbitmq_broker()


@pytest.fixture
def rabbitmq(rabbitmq_session: RabbitMQ) -> RabbitMQ:
    """The session RabbitMQ; restarted if a test left it stopped or killed."""
    if rabbitmq_session.proc is None or rabbitmq_session.proc.poll() is not None:
        rabbitmq_session.stop()
        rabbitmq_session.start()
    return rabbitmq_session
