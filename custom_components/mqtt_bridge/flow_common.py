"""Flow helpers shared by the entry types: the MQTT broker check and form selectors.

The broker check is the engine's one connection check
(:func:`.engine.mqtt_client.check_connection`: MQTT 5, falling back to 3.1.1,
connect once and disconnect); this module only maps its errors to the flows'
error keys, which ``translations/en.json`` explains under ``config.error``
and ``options.error``.
"""

from __future__ import annotations

import logging
from typing import Final

from homeassistant.helpers.selector import (
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    TextSelector,
    TextSelectorConfig,
    TextSelectorType,
)

from .engine.mqtt_client import (
    MqttAuthError,
    MqttError,
    MqttSettings,
    MqttTimeoutError,
    MqttTlsError,
    check_connection,
)

_LOGGER = logging.getLogger(__name__)

# Seconds the flows wait for a broker's check (TCP, TLS and CONNACK together).
BROKER_TIMEOUT: Final = 10.0

PASSWORD_SELECTOR: Final = TextSelector(
    TextSelectorConfig(type=TextSelectorType.PASSWORD)
)
PORT_SELECTOR: Final = NumberSelector(
    NumberSelectorConfig(min=1, max=65535, step=1, mode=NumberSelectorMode.BOX)
)


async def async_check_broker(settings: MqttSettings, errors: dict[str, str]) -> bool:
    """Connect to the broker of ``settings`` once; on failure set ``errors["base"]``.

    Error keys: ``invalid_auth`` (CONNACK rejected the credentials or the client
    is not authorised), ``tls_failed`` (TLS handshake or certificate check),
    ``timeout`` (no CONNACK within :data:`BROKER_TIMEOUT` seconds),
    ``cannot_connect`` (unreachable or refused for another reason), ``unknown``
    (anything else, logged with its traceback). Returns whether the check passed.
    """
    try:
        await check_connection(settings, timeout=BROKER_TIMEOUT)
    except MqttAuthError:
        errors["base"] = "invalid_auth"
    except MqttTlsError as err:
        _LOGGER.debug(
            "TLS with broker %s:%s failed: %s", settings.host, settings.port, err
        )
        errors["base"] = "tls_failed"
    except MqttTimeoutError:
        errors["base"] = "timeout"
    except MqttError as err:
        _LOGGER.debug(
            "Cannot connect to broker %s:%s: %s", settings.host, settings.port, err
        )
        errors["base"] = "cannot_connect"
    except Exception:
        _LOGGER.exception("Unexpected error while checking the broker")
        errors["base"] = "unknown"
    return not errors
