"""``fedlog provision DIR --sites a,b [--server-url URL] [--tls] [--force]``: issue credentials."""

from __future__ import annotations

import argparse
from typing import Any

from engine.provision import CREDENTIALS_FILE, SERVER_DIR, provision

__all__ = ["cmd_provision", "register"]

_EXAMPLES = """\
examples:
  fedlog provision fed --sites site-1,site-2                  # first run: sites + admin
  fedlog provision fed --sites site-3                         # later: add a site, keep the others
  fedlog provision fed --sites site-2 --force                 # new token for site-2 (old one stops working)
  fedlog provision fed --sites site-1 --tls --server-url https://fl.example.org:8700
"""


def register(sub: Any) -> None:
    """Add the ``provision`` command."""
    parser = sub.add_parser(
        "provision",
        help="create a credential for each site and the admin (and optionally TLS certificates)",
        description="Write DIR/server/credentials.json (hashes only) and one DIR/<name>/ folder per "
                    "identity holding its own token. Hand each folder to that site's operator only.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", metavar="DIR", help="the federation's provisioning folder")
    parser.add_argument("--sites", required=True, metavar="NAMES",
                        help="comma-separated site names (lower-case letters, digits, '-', '_')")
    parser.add_argument("--server-url", metavar="URL",
                        help="URL the sites will call (default: the recorded one, else http://127.0.0.1:8700)")
    parser.add_argument("--admin", default="admin", metavar="NAME", help="the admin identity's name")
    parser.add_argument("--tls", action="store_true",
                        help="also create a private CA and a server certificate for the URL's host")
    parser.add_argument("--force", action="store_true",
                        help="issue new tokens for named identities that already exist")
    parser.add_argument("--rotate-admin", action="store_true", help="issue a new token for the admin too")
    parser.set_defaults(func=cmd_provision)


def cmd_provision(args: argparse.Namespace) -> int:
    """Run ``provision`` with the parsed flags and print what it did."""
    result = provision(
        args.directory, args.sites.split(","), server_url=args.server_url, admin_name=args.admin,
        tls=args.tls, force=args.force, rotate_admin=args.rotate_admin,
    )
    root = result.directory
    print(f"{root}: server URL {result.server_url}")
    for label, names in (("created", result.created), ("new token for", result.replaced),
                         ("kept", result.kept)):
        if names:
            print(f"  {label}: {', '.join(names)}")
    print(f"  server credentials: {root / SERVER_DIR / CREDENTIALS_FILE} (hashes only)")
    if result.tls_dir is not None:
        print(f"  TLS: CA and server certificate in {result.tls_dir}")
    for name in (*result.created, *result.replaced):
        print(f"  give {root / name}/ to {name!r} only: it holds that identity's secret token")
    return 0
