"""The client side of fedlog: how a site (or the admin) reaches the server.

``transport`` (Transport, HttpTransport, AsgiTransport) and ``errors``
(TransportError, RemoteError, AuthError).
"""
