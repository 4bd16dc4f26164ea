"""A private Mosquitto broker on a random 127.0.0.1 port, for tests, the demo and benches.

Started as a subprocess of the Debian ``mosquitto`` binary with
``set_tcp_nodelay true`` and ``max_queued_messages 0`` (see
``shared/reference/mqtt-broker.md`` §7-8), optionally with a password file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

_CONF = """\
user root
per_listener_settings false
listener {port} 127.0.0.1
allow_anonymous {anonymous}
persistence false
set_tcp_nodelay true
max_queued_messages 0
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
{extra}
"""


def find_mosquitto() -> str:
    """Return the path of the ``mosquitto`` binary.

    Raises:
        FileNotFoundError: Mosquitto is not installed (``scripts/setup`` installs it).

    """
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "mosquitto is not installed; run scripts/setup (apt-get install mosquitto)"
    )


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    # pytest-socket may have replaced socket.socket; use the original class.
    try:
        import pytest_socket

        sock_cls = pytest_socket._true_socket
    except ImportError:
        sock_cls = socket.socket
    with sock_cls(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """One Mosquitto process; ``start()``, ``stop()``, ``kill()``, ``restart()``.

    The port is chosen once and kept across restarts, so clients can reconnect.
    ``users`` maps usernames to passwords and turns anonymous access off.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        users: dict[str, str] | None = None,
        extra_config: str = "",
        workdir: Path | None = None,
        tls: bool = False,
        popen_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Prepare (not start) a broker; ``tls`` adds a self-signed TLS listener.

        ``popen_kwargs`` are passed to :class:`subprocess.Popen` (e.g.
        ``start_new_session`` for the demo, so Ctrl-C reaches Home Assistant first).
        """
        self._popen_kwargs = popen_kwargs or {}
        self.port = port or free_port()
        self.tls_port: int | None = free_port() if tls else None
        self.host = "127.0.0.1"
        self.users = users or {}
        self._extra = extra_config
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="mosquitto-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"

    def _write_config(self) -> Path:
        extra = self._extra
        if self.users:
            pwfile = self.workdir / "passwd"
            pwfile.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    [
                        shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd",
                        "-b",
                        str(pwfile),
                        user,
                        password,
                    ],
                    check=True,
                    capture_output=True,
                )
            extra = f"password_file {pwfile}\n{extra}"
        if self.tls_port is not None:
            cert, key = self._self_signed()
            extra = (
                f"listener {self.tls_port} 127.0.0.1\n"
                f"certfile {cert}\nkeyfile {key}\n{extra}"
            )
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            _CONF.format(
                port=self.port,
                anonymous="false" if self.users else "true",
                extra=extra,
            )
        )
        return conf

    @property
    def cert_path(self) -> Path:
        """The self-signed certificate of the TLS listener (PEM)."""
        return self.workdir / "cert.pem"

    def _self_signed(self) -> tuple[Path, Path]:
        """Write a self-signed certificate for 127.0.0.1 and its key."""
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        key_path = self.workdir / "key.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return self.cert_path, key_path

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until it listens.

        Raises:
            RuntimeError: the broker exited or did not listen within ``timeout``.

        """
        conf = self._write_config()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            **self._popen_kwargs,
        )
        log.close()
        # "running" is logged after every listener is bound and listening.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                text = handle.read().decode(errors="replace")
            if " running" in text:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.005)
        self.stop()
        raise RuntimeError(f"mosquitto did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        """Terminate the broker and wait for it (idempotent)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Kill the broker abruptly (SIGKILL), as a crash or power loss would."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Start again on the same port after :meth:`stop` or :meth:`kill`."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the broker and remove its work directory if it created one."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        """Start on entry."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Clean up on exit."""
        self.cleanup()
