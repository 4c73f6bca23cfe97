"""The server side of fedlog's transport: a plain ASGI app, identities and serving.

``http`` (App, Request, Response, Limits), ``errors`` (HttpError), ``routing`` (Route, Router),
``auth`` (CredentialStore, Identity, audit events), ``openapi`` (the published
description), ``serve`` (uvicorn in a thread or a process), ``tls`` (a private CA).
"""
