"""The gateway's own error tree: every error the service raises on purpose is a GatewayError, and each adapter turns
its library's errors into one of these (tests/test_adapters.py keeps the libraries in their adapters)."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of the gateway's errors: catch this, never a library's exception type, outside an adapter."""
