# SPDX-License-Identifier: LGPL-2.1-or-later
"""TLS credentials for the tests, made with GnuTLS's certtool and psktool in
a test's temporary directory (tests/lib and tests/integration use them):

  pki.server   ca-cert.pem, server-cert.pem, server-key.pem   (what the server loads)
  pki.client   ca-cert.pem, client-cert.pem, client-key.pem   (a client the CA signed)
  pki.rogue    the same, but the client certificate is signed by another CA of the same
               name (so that a client offers it when the server asks for that CA's)
  pki.nocert   ca-cert.pem only: a client that trusts the server and has no certificate
  pki.revoked  a client certificate the CA signed, then revoked
  pki.server_crl  pki.server with ca-crl.pem, the CA's revocation list naming pki.revoked's

laid out as QEMU's tls-creds-x509 and libnbd's tls-certificates= want them.
The server certificate is for localhost, 127.0.0.1 and ::1."""
import shutil
import subprocess
from types import SimpleNamespace

import pytest

have_tools = bool(shutil.which("certtool") and shutil.which("psktool"))
needs_tools = pytest.mark.skipif(not have_tools, reason="certtool/psktool (gnutls-bin) are not installed")


def _certtool(*args):
    p = subprocess.run(["certtool", *[str(a) for a in args]], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def _key(path):
    _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", path)


def _template(d, name, text):
    path = d / name
    path.write_text(text)
    return path


def _ca(d, stem):
    _key(d / f"{stem}-key.pem")
    t = _template(d, f"{stem}.info", "cn = test CA\nca\ncert_signing_key\nexpiration_days = 2\n")
    _certtool("--generate-self-signed", "--load-privkey", d / f"{stem}-key.pem", "--template", t,
              "--outfile", d / f"{stem}-cert.pem")
    return d / f"{stem}-cert.pem", d / f"{stem}-key.pem"


def _signed(d, name, ca, info):
    _key(d / f"{name}-key.pem")
    t = _template(d, f"{name}.info", info + "encryption_key\nsigning_key\nexpiration_days = 2\n")
    _certtool("--generate-certificate", "--load-ca-certificate", ca[0], "--load-ca-privkey", ca[1],
              "--load-privkey", d / f"{name}-key.pem", "--template", t, "--outfile", d / f"{name}-cert.pem")


def make_pki(base):
    work = base / "work"
    work.mkdir(parents=True)
    ca = _ca(work, "ca")
    other = _ca(work, "otherca")
    _signed(work, "server", ca, "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"
            "ip_address = ::1\ntls_www_server\n")
    _signed(work, "client", ca, "cn = client\ntls_www_client\n")
    _signed(work, "rogue", other, "cn = rogue\ntls_www_client\n")
    _signed(work, "revoked", ca, "cn = revoked\ntls_www_client\n")
    t = _template(work, "crl.info", "crl_next_update = 2\ncrl_number = 1\n")
    _certtool("--generate-crl", "--load-ca-privkey", ca[1], "--load-ca-certificate", ca[0], "--load-certificate",
              work / "revoked-cert.pem", "--template", t, "--outfile", work / "ca-crl.pem")
    dirs = SimpleNamespace()
    for name, files in (("server", {"server-cert.pem": "server-cert.pem", "server-key.pem": "server-key.pem"}),
                        ("client", {"client-cert.pem": "client-cert.pem", "client-key.pem": "client-key.pem"}),
                        ("rogue", {"client-cert.pem": "rogue-cert.pem", "client-key.pem": "rogue-key.pem"}),
                        ("revoked", {"client-cert.pem": "revoked-cert.pem", "client-key.pem": "revoked-key.pem"}),
                        ("server_crl", {"server-cert.pem": "server-cert.pem", "server-key.pem": "server-key.pem",
                                        "ca-crl.pem": "ca-crl.pem"}),
                        ("nocert", {})):
        d = base / name
        d.mkdir()
        shutil.copy(work / "ca-cert.pem", d / "ca-cert.pem")
        for dst, src in files.items():
            shutil.copy(work / src, d / dst)
        setattr(dirs, name, d)
    return dirs


def make_psk(d, user="alice"):
    """D/keys.psk, with a fresh key for USER (a directory of its own, as QEMU's tls-creds-psk wants); returns its path."""
    d.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["psktool", "-u", user, "-p", str(d / "keys.psk")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return d / "keys.psk"


def credentials(tmp_path_factory):
    """Everything the TLS tests use, made once per module: make_pki's directories, and the PSK files psk
    (alice), badpsk (alice with another key) and stranger (bob).  Skips without certtool and psktool."""
    if not have_tools:
        pytest.skip("certtool/psktool (gnutls-bin) are not installed")
    base = tmp_path_factory.mktemp("pki")
    d = make_pki(base)
    d.psk = make_psk(base / "psk", "alice")
    d.badpsk = make_psk(base / "badpsk", "alice")
    d.stranger = make_psk(base / "stranger", "bob")
    return d
