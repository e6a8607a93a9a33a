"""TLS contexts: the gateway's and points' listeners, and the gateway's connections to points.

A listener with `client_ca_file` requires a client certificate signed by that CA (mutual TLS):
a point configured so accepts only gateways holding one. Connections to `https://` points verify
the point's certificate against `gateway.point_tls.ca_file` (its name must match the URL's host)
and present the gateway's client certificate when one is configured. TLS 1.2 at least.
"""

from __future__ import annotations

import ssl

from grifo.config.model import PointTlsConfig, TlsConfig


def server_context(config: TlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.cert_file, config.key_file)
    if config.client_ca_file is not None:
        context.load_verify_locations(config.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(config: PointTlsConfig | None) -> ssl.SSLContext:
    """For `https://` points: verify them (the configured CA, else the system's), and show
    the gateway's certificate if it has one."""
    context = ssl.create_default_context(
        cafile=None if config is None else config.ca_file,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config is not None and config.cert_file is not None and config.key_file is not None:
        context.load_cert_chain(config.cert_file, config.key_file)
    return context
