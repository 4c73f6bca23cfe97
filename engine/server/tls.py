"""A private certificate authority and a server certificate for one federation.

``ensure_certificates(folder, hosts)`` makes (or reuses) ``ca.pem``/``ca.key`` and a
server certificate ``server.pem``/``server.key`` valid for ``hosts`` plus the
loopback names. Sites trust ``ca.pem`` only, so nobody else's certificate can stand
in for the server. Keys are ECDSA P-256 and written with mode 0600.

The ``cryptography`` package is used when it can be imported; otherwise the
``openssl`` command-line tool; with neither, provisioning TLS is refused with a
clear error (plain HTTP provisioning needs none of this).
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.util
import ipaddress
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

__all__ = ["TlsFiles", "ensure_certificates"]

CA_DAYS = 3650
SERVER_DAYS = 825
LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the CA and the server certificate live."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def ensure_certificates(directory: Path, hosts: Sequence[str]) -> TlsFiles:
    """Create the CA and server certificate in ``directory`` unless they exist.

    Args:
        directory: the folder for the four PEM files (created with mode 0700).
        hosts: DNS names or IP addresses the server is reached at.

    Returns:
        The paths of the files.

    Raises:
        ConfigError: neither ``cryptography`` nor ``openssl`` is available, or generation failed.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = TlsFiles(directory, directory / "ca.pem", directory / "ca.key",
                     directory / "server.pem", directory / "server.key")
    names = list(dict.fromkeys([*hosts, *LOOPBACK]))
    maker: _OpensslMaker | _CryptographyMaker
    if importlib.util.find_spec("cryptography") is not None:
        maker = _CryptographyMaker()
    else:
        maker = _OpensslMaker()
    if not (files.ca_cert.exists() and files.ca_key.exists()):
        maker.make_ca(files)
    if not (files.server_cert.exists() and files.server_key.exists()):
        maker.make_server(files, names)
    for key in (files.ca_key, files.server_key):
        os.chmod(key, 0o600)
    return files


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _OpensslMaker:
    """Generates the certificates with the ``openssl`` command."""

    def __init__(self) -> None:
        tool = shutil.which("openssl")
        if tool is None:
            raise ConfigError(
                "TLS provisioning needs the 'cryptography' Python package or the 'openssl' command; "
                "neither is available"
            )
        self.tool = tool

    def _run(self, *args: str, cwd: Path) -> None:
        done = subprocess.run([self.tool, *args], cwd=cwd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")

    def make_ca(self, files: TlsFiles) -> None:
        with tempfile.TemporaryDirectory(dir=files.directory) as tmp:
            work = Path(tmp)
            self._run(
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "ca.key", "-out", "ca.pem", "-days", str(CA_DAYS), "-subj", "/CN=fedlog CA",
                "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-addext", "subjectKeyIdentifier=hash",
                cwd=work,
            )
            _install(work / "ca.key", files.ca_key, 0o600)
            _install(work / "ca.pem", files.ca_cert, 0o644)

    def make_server(self, files: TlsFiles, names: Sequence[str]) -> None:
        san = ",".join(f"IP:{n}" if _is_ip(n) else f"DNS:{n}" for n in names)
        with tempfile.TemporaryDirectory(dir=files.directory) as tmp:
            work = Path(tmp)
            (work / "ext.cnf").write_text(
                f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n"
            )
            self._run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                      "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={names[0]}", cwd=work)
            self._run("x509", "-req", "-in", "server.csr", "-CA", str(files.ca_cert),
                      "-CAkey", str(files.ca_key), "-set_serial", str(int.from_bytes(os.urandom(16), "big") >> 1),
                      "-days", str(SERVER_DAYS), "-extfile", "ext.cnf", "-out", "server.pem", cwd=work)
            _install(work / "server.key", files.server_key, 0o600)
            _install(work / "server.pem", files.server_cert, 0o644)


class _CryptographyMaker:
    """Generates the certificates with the ``cryptography`` package.

    Its modules are imported by name (typed ``Any``): the package is optional, and
    the type check must not depend on whether it is installed.
    """

    def __init__(self) -> None:
        self.x509: Any = importlib.import_module("cryptography.x509")
        self.oid: Any = importlib.import_module("cryptography.x509.oid")
        self.hashes: Any = importlib.import_module("cryptography.hazmat.primitives.hashes")
        self.ec: Any = importlib.import_module("cryptography.hazmat.primitives.asymmetric.ec")
        self.ser: Any = importlib.import_module("cryptography.hazmat.primitives.serialization")

    def _key_pem(self, key: Any) -> bytes:
        ser = self.ser
        return bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))

    def _usage(self, *, sign_certs: bool) -> Any:
        # KeyUsage(digital_signature, content_commitment, key_encipherment, data_encipherment,
        #          key_agreement, key_cert_sign, crl_sign, encipher_only, decipher_only)
        return self.x509.KeyUsage(not sign_certs, False, False, False, False, sign_certs, sign_certs,
                                  False, False)

    def make_ca(self, files: TlsFiles) -> None:
        x509, ec = self.x509, self.ec
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(self.oid.NameOID.COMMON_NAME, "fedlog CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(self._usage(sign_certs=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, self.hashes.SHA256())
        )
        _write(files.ca_key, self._key_pem(key), 0o600)
        _write(files.ca_cert, cert.public_bytes(self.ser.Encoding.PEM), 0o644)

    def make_server(self, files: TlsFiles, names: Sequence[str]) -> None:
        x509, ec = self.x509, self.ec
        ca_key = self.ser.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        alt = [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in names]
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(self.oid.NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(self._usage(sign_certs=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([self.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                           critical=False)
            .sign(ca_key, self.hashes.SHA256())
        )
        _write(files.server_key, self._key_pem(key), 0o600)
        _write(files.server_cert, cert.public_bytes(self.ser.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)


def _install(source: Path, target: Path, mode: int) -> None:
    os.chmod(source, mode)
    os.replace(source, target)
