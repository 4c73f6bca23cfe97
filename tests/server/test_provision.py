"""``fedlog provision``: per-identity credentials, file modes, re-runs, TLS material."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import orjson
import pytest

from engine.commands import provision as provision_command
from engine.errors import ConfigError
from engine.provision import (
    hash_token,
    load_identity,
    load_server_credentials,
    provision,
    token_name,
)
from engine.server.auth import CredentialStore
from engine.server.http import HttpError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes (to prove nothing changed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def authenticates(store: CredentialStore, token: str) -> str | None:
    try:
        return store.authenticate(f"Bearer {token}").name
    except HttpError:
        return None


def test_first_run_writes_private_files(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    result = provision(root, ["site-1", "site-2"], server_url="http://fl.example.org:9000/")
    assert result.created == ["site-1", "site-2", "admin"] and not result.replaced and not result.kept
    assert result.server_url == "http://fl.example.org:9000"
    server_file = root / "server" / "credentials.json"
    assert mode(root) == mode(root / "server") == 0o700
    assert mode(server_file) == 0o600
    url, creds, tls = load_server_credentials(root / "server")
    assert url == "http://fl.example.org:9000" and tls == {}
    assert {n: c.role for n, c in creds.items()} == {"site-1": "site", "site-2": "site", "admin": "admin"}
    server_text = server_file.read_text()
    for name in ("site-1", "site-2", "admin"):
        ident = load_identity(root / name)
        assert mode(root / name) == 0o700 and mode(root / name / "credentials.json") == 0o600
        assert (ident.name, ident.server_url, ident.ca_cert) == (name, "http://fl.example.org:9000", None)
        assert ident.role == ("admin" if name == "admin" else "site")
        assert token_name(ident.token) == name
        # the server keeps a salted hash, never the token or its secret part
        assert ident.token not in server_text and ident.token.split(".")[2] not in server_text
        cred = creds[name]
        assert cred.digest == hash_token(ident.token, bytes.fromhex(cred.salt))
    salts = {c.salt for c in creds.values()}
    assert len(salts) == 3
    assert not list(root.rglob("*.tmp"))


def test_every_identity_has_its_own_token(tmp_path: Path) -> None:
    provision(tmp_path, ["a", "b"])
    store = CredentialStore.load(tmp_path / "server")
    tokens = {n: load_identity(tmp_path / n).token for n in ("a", "b", "admin")}
    assert len(set(tokens.values())) == 3
    assert {n: authenticates(store, t) for n, t in tokens.items()} == {"a": "a", "b": "b", "admin": "admin"}
    assert store.role_of("a") == "site" and store.role_of("admin") == "admin" and store.role_of("z") is None


def test_rerun_adds_sites_and_keeps_existing_credentials(tmp_path: Path) -> None:
    provision(tmp_path, ["site-1"])
    store = CredentialStore.load(tmp_path / "server")
    before = {n: load_identity(tmp_path / n).token for n in ("site-1", "admin")}
    result = provision(tmp_path, ["site-2", "site-3"])
    assert result.created == ["site-2", "site-3"] and sorted(result.kept) == ["admin", "site-1"]
    assert {n: load_identity(tmp_path / n).token for n in ("site-1", "admin")} == before
    store.reload()
    for name, token in before.items():
        assert authenticates(store, token) == name
    assert authenticates(store, load_identity(tmp_path / "site-3").token) == "site-3"
    assert store.names == ["admin", "site-1", "site-2", "site-3"]


def test_existing_identity_is_refused_without_force(tmp_path: Path) -> None:
    provision(tmp_path, ["site-1", "site-2"])
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"site-1 already exist.*--force"):
        provision(tmp_path, ["site-3", "site-1"])
    assert snapshot(tmp_path) == before  # not even site-3 was written


def test_force_replaces_only_the_named_identity(tmp_path: Path) -> None:
    provision(tmp_path, ["site-1", "site-2"])
    old = {n: load_identity(tmp_path / n).token for n in ("site-1", "site-2", "admin")}
    result = provision(tmp_path, ["site-1"], force=True)
    assert result.replaced == ["site-1"] and result.created == []
    store = CredentialStore.load(tmp_path / "server")
    assert authenticates(store, old["site-1"]) is None
    assert authenticates(store, load_identity(tmp_path / "site-1").token) == "site-1"
    assert authenticates(store, old["site-2"]) == "site-2"
    assert authenticates(store, old["admin"]) == "admin"


def test_rotate_admin(tmp_path: Path) -> None:
    provision(tmp_path, ["a"])
    old = load_identity(tmp_path / "admin").token
    result = provision(tmp_path, [], rotate_admin=True)
    assert result.replaced == ["admin"]
    store = CredentialStore.load(tmp_path / "server")
    assert authenticates(store, old) is None
    assert authenticates(store, load_identity(tmp_path / "admin").token) == "admin"


def test_orphan_identity_folder_counts_as_existing(tmp_path: Path) -> None:
    # e.g. a run that died after writing the identity file, before the server file
    (tmp_path / "site-1").mkdir()
    (tmp_path / "site-1" / "credentials.json").write_text("{}")
    with pytest.raises(ConfigError, match="already exist"):
        provision(tmp_path, ["site-1"])
    provision(tmp_path, ["site-1"], force=True)
    assert load_identity(tmp_path / "site-1").name == "site-1"


@pytest.mark.parametrize(("sites", "kwargs", "message"), [
    (["Site-1"], {}, "not allowed"),
    (["site.1"], {}, "not allowed"),
    (["-x"], {}, "not allowed"),
    (["a" * 64], {}, "not allowed"),
    (["server"], {}, "reserved"),
    (["a", "a"], {}, "given twice"),
    (["admin"], {}, "admin's name"),
    (["a"], {"admin_name": "Root"}, "not allowed"),
    (["a"], {"server_url": "fl.example.org:1"}, "must look like"),
    (["a"], {"server_url": "http://h:70000"}, "Port out of range"),
    (["a"], {"server_url": "http://h:1", "tls": True}, "needs an https"),
])
def test_bad_requests_write_nothing(tmp_path: Path, sites: list[str], kwargs: dict[str, object],
                                    message: str) -> None:
    root = tmp_path / "fed"
    with pytest.raises(ConfigError, match=message):
        provision(root, sites, **kwargs)  # type: ignore[arg-type]
    assert not root.exists()


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such credentials file"),
    (b"{", "not valid JSON"),
    (b'{"format": "other"}', "not a fedlog-identity/1 file"),
    (b'{"format": "fedlog-identity/1", "name": "a"}', "malformed"),
])
def test_unusable_identity_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    if content is not None:
        (tmp_path / "credentials.json").write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_identity(tmp_path)


def test_tampered_server_file_is_refused(tmp_path: Path) -> None:
    provision(tmp_path, ["a"])
    path = tmp_path / "server" / "credentials.json"
    doc = orjson.loads(path.read_bytes())
    doc["identities"]["a"]["role"] = "superuser"
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(ConfigError, match="unknown role"):
        CredentialStore.load(path)


def test_loose_permissions_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    provision(tmp_path, ["a"])
    os.chmod(tmp_path / "a" / "credentials.json", 0o644)
    load_identity(tmp_path / "a")
    assert "readable by other users" in caplog.text


needs_tls_tool = pytest.mark.skipif(
    shutil.which("openssl") is None and __import__("importlib").util.find_spec("cryptography") is None,
    reason="neither openssl nor cryptography is available",
)


@needs_tls_tool
def test_tls_material(tmp_path: Path) -> None:
    result = provision(tmp_path, ["site-1"], server_url="https://fl.example.org:8700", tls=True)
    tls = tmp_path / "server" / "tls"
    assert result.tls_dir == tls
    assert mode(tls / "ca.key") == mode(tls / "server.key") == 0o600
    _, _, section = load_server_credentials(tmp_path / "server")
    assert section == {"ca": "tls/ca.pem", "cert": "tls/server.pem", "key": "tls/server.key"}
    ident = load_identity(tmp_path / "site-1")
    assert ident.ca_cert == tmp_path / "site-1" / "ca.pem"
    assert ident.ca_cert.read_bytes() == (tls / "ca.pem").read_bytes()
    assert not (tmp_path / "site-1" / "ca.key").exists()
    if shutil.which("openssl"):
        text = subprocess.run(["openssl", "x509", "-in", str(tls / "server.pem"), "-noout", "-text"],
                              capture_output=True, text=True, check=True).stdout
        assert "DNS:fl.example.org" in text and "IP Address:127.0.0.1" in text
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(tls / "ca.pem"), str(tls / "server.pem")],
                                capture_output=True, text=True, check=False)
        assert verify.returncode == 0, verify.stderr
    # a later run (even without --tls) reuses the CA and hands it to the new site
    ca_before = (tls / "ca.pem").read_bytes()
    provision(tmp_path, ["site-2"])
    assert (tls / "ca.pem").read_bytes() == ca_before
    assert load_identity(tmp_path / "site-2").ca_cert is not None
    assert (tmp_path / "site-2" / "ca.pem").read_bytes() == ca_before


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedlog")
    provision_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "fed"
    assert run_cli(["provision", str(root), "--sites", "site-1,site-2"]) == 0
    out = capsys.readouterr().out
    assert "created: site-1, site-2, admin" in out
    assert f"give {root / 'site-1'}/ to 'site-1' only" in out
    assert run_cli(["provision", str(root), "--sites", "site-3"]) == 0
    out = capsys.readouterr().out
    assert "created: site-3" in out and "kept: " in out
    with pytest.raises(ConfigError, match="already exist"):
        run_cli(["provision", str(root), "--sites", "site-3"])
    assert run_cli(["provision", str(root), "--sites", "site-3", "--force"]) == 0
    assert "new token for: site-3" in capsys.readouterr().out
