"""kafka-python's connection settings for one mapping (or a sender): the bootstrap servers
from the URI, security from the config file, passwords from the environment."""

from __future__ import annotations

import os
from typing import Any

from poller.config import Config, KafkaClientConfig
from poller.sources.base import SourceContext, SourceError

# kafka-python's own defaults would have a join wait ~22 s on a broker that holds it for half
# the session timeout; these are Kafka's usual values for a consumer that polls all the time.
DEFAULT_SESSION_TIMEOUT_MS = 10_000
DEFAULT_HEARTBEAT_INTERVAL_MS = 3_000


def settings_for(context: SourceContext) -> KafkaClientConfig:
    """The mapping's ``[kafka.mappings.NAME]`` (by name or UUID) over ``[kafka]``."""
    mapping = context.mapping
    name = getattr(mapping, "name", None)
    return context.config.kafka.for_mapping(name, context.mapping_uuid)


def connection_options(
    settings: KafkaClientConfig, bootstrap: list[str], shown: str
) -> dict[str, Any]:
    """Keyword arguments every kafka-python client of this cluster takes."""
    protocol = settings.security_protocol or "PLAINTEXT"
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "security_protocol": protocol,
        "client_id": settings.client_id or "poller",
    }
    if settings.request_timeout_ms is not None:
        options["request_timeout_ms"] = settings.request_timeout_ms
    if protocol.startswith("SASL_"):
        options["sasl_mechanism"] = settings.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = _secret(settings.sasl_password_env, shown)
    if protocol.endswith("SSL"):
        options["ssl_cafile"] = settings.ssl_ca_file
        options["ssl_certfile"] = settings.ssl_cert_file
        options["ssl_keyfile"] = settings.ssl_key_file
        if settings.ssl_key_password_env:
            options["ssl_password"] = _secret(settings.ssl_key_password_env, shown)
        if settings.ssl_check_hostname is not None:
            options["ssl_check_hostname"] = settings.ssl_check_hostname
    return options


def consumer_timings(settings: KafkaClientConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "session_timeout_ms": settings.session_timeout_ms or DEFAULT_SESSION_TIMEOUT_MS,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms
        or min(DEFAULT_HEARTBEAT_INTERVAL_MS, (settings.session_timeout_ms or 10_000) // 3),
    }
    if settings.max_poll_interval_ms is not None:
        options["max_poll_interval_ms"] = settings.max_poll_interval_ms
    if settings.fetch_max_wait_ms is not None:
        options["fetch_max_wait_ms"] = settings.fetch_max_wait_ms
    return options


def _secret(variable: str | None, shown: str) -> str:
    value = os.environ.get(variable or "")
    if not value:
        raise SourceError(
            f"{shown}: the environment variable {variable} named in the [kafka] config is not "
            "set (it must hold the password); set it in the daemon's environment",
            retryable=False,
        )
    return value


def sender_settings(config: Config) -> KafkaClientConfig:
    """A sender (``poller send``) serves no mapping: the ``[kafka]`` defaults."""
    return config.kafka.for_mapping()
