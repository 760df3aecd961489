"""Whether the services some tests need answer on this machine."""

from __future__ import annotations

import socket


def broker_up(port: int = 5672) -> bool:
    """Whether RabbitMQ accepts connections on loopback."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False
