"""A real Home Assistant process on a prepared configuration directory.

Shared by the demo (``devkit/demo.py``), ``tests/test_real_hass.py`` and
``bench/tools.py``. It

* prepares a configuration directory: ``configuration.yaml``, the
  ``custom_components/mqtt_bridge`` symlink, a finished onboarding and config
  entries of this integration written straight into ``.storage`` (the format of
  HA 2025.4's ``ConfigEntryStore``, entries at the config flow's
  ``VERSION``/``MINOR_VERSION``);
* writes a login into ``.storage`` as ``hass --script auth add`` does (the
  first login through the login flow turns it into an administrator);
* starts ``hass -c DIR --skip-pip`` (:class:`HassProcess`, a plain subprocess
  in a session of its own, killed with its process group);
* talks to the running Home Assistant the way a user does: the login flow
  (:func:`login`), the websocket API (:class:`HassWebSocket`) for a long-lived
  access token (``auth/long_lived_access_token``) and for extra users
  (``config/auth/create`` + ``config/auth_provider/homeassistant/create``),
  and the REST API for config entry states (:func:`wait_for_entries`).

Nothing here imports Home Assistant at module level, so the demo and the
benchmark can import it cheaply; the storage keys are read from HA lazily.
"""

from __future__ import annotations

import ast
import asyncio
import base64
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from types import TracebackType
from typing import Any, Self
import uuid

import aiohttp
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

REPO_ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "mqtt_bridge"
INTEGRATION_DIR = REPO_ROOT / "custom_components" / DOMAIN
RESTART_EXIT_CODE = 100  # homeassistant.const.RESTART_EXIT_CODE

#: Config entry states that will not turn into "loaded" by waiting.
FAILED_STATES = frozenset(
    {"setup_error", "migration_error", "not_loaded", "failed_unload"}
)

#: Storage key of the ``homeassistant`` auth provider's logins.
AUTH_PROVIDER_KEY = "auth_provider.homeassistant"

#: ``configuration.yaml`` of a throw-away Home Assistant (tests, benchmark):
#: HTTP on 127.0.0.1 only, the ``config`` integration for the websocket user
#: commands, little logging.
MINIMAL_CONFIGURATION_YAML = """\
homeassistant:
  name: MQTT Bridge test
  unit_system: metric
  time_zone: UTC
  country: NL
  currency: EUR
  latitude: 52.37
  longitude: 4.89
  elevation: 0

http:
  server_host: 127.0.0.1
  server_port: {port}

config:

logger:
  default: warning
  logs:
    custom_components.{domain}: {log_level}
"""


# --------------------------------------------------------------------------
# The configuration directory
# --------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as HA's storage helper does: indented, atomically, 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.runner-tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def flow_versions() -> tuple[int, int]:
    """Return (VERSION, MINOR_VERSION) of the integration's config flow, or (1, 1).

    Read with ``ast`` rather than imported: importing would pull in HA here.
    """
    version, minor = 1, 1
    source = INTEGRATION_DIR / "config_flow.py"
    if not source.is_file():
        return version, minor
    with contextlib.suppress(SyntaxError, OSError):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            if not any(kw.arg == "domain" for kw in node.keywords):
                continue
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, int)
                ):
                    if stmt.targets[0].id == "VERSION":
                        version = stmt.value.value
                    elif stmt.targets[0].id == "MINOR_VERSION":
                        minor = stmt.value.value
    return version, minor


def link_integration(config_dir: Path) -> str | None:
    """Symlink ``config_dir/custom_components/mqtt_bridge`` to the repository's code.

    Returns a warning when a real directory is in the way (it is left alone).
    """
    link = config_dir / "custom_components" / DOMAIN
    link.parent.mkdir(parents=True, exist_ok=True)
    target = Path(os.path.relpath(INTEGRATION_DIR, link.parent))
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return None
        link.unlink()
    elif link.exists():
        return f"{link} is not a symlink; leaving it (it shadows {INTEGRATION_DIR})"
    link.symlink_to(target, target_is_directory=True)
    return None


def write_onboarding(storage: Path) -> None:
    """Mark every onboarding step done, so HA shows its login page."""
    from homeassistant.components.onboarding import STORAGE_KEY, STORAGE_VERSION
    from homeassistant.components.onboarding.const import STEPS

    path = storage / STORAGE_KEY
    if path.exists():
        return
    write_json(
        path,
        {
            "version": STORAGE_VERSION,
            "minor_version": 1,
            "key": STORAGE_KEY,
            "data": {"done": list(STEPS)},
        },
    )


@dataclass(slots=True)
class EntrySpec:
    """A config entry of this integration to write into ``.storage``.

    An existing entry with the same ``unique_id`` is updated: its ``data`` is
    merged with ``data``; its ``options`` are replaced only when
    ``replace_options`` (the user's edits in the UI are kept otherwise).
    """

    title: str
    unique_id: str
    data: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    replace_options: bool = False
    #: Finds the existing entry instead of the unique id (e.g. when the unique
    #: id contains a port that changes on every start); the unique id is then
    #: updated too.
    match: Callable[[Mapping[str, Any]], bool] | None = None
    #: Options added to the entry (new or existing) where it has no such key
    #: (a feature the demo turns on once; a later change in the UI is kept).
    option_defaults: dict[str, Any] = field(default_factory=dict)
    #: Config subentries (``subentry_type``, ``title``, ``unique_id``, ``data``):
    #: one missing from the entry (by type and unique id) is added; an existing
    #: one gets ``data`` merged in (e.g. a path that moved), the rest of it and
    #: subentries the user added are kept.
    subentries: list[dict[str, Any]] = field(default_factory=list)

    def matches(self, entry: Mapping[str, Any]) -> bool:
        """Whether stored ``entry`` is this spec's entry."""
        if entry.get("domain") != DOMAIN:
            return False
        if self.match is not None:
            return self.match(entry)
        return entry.get("unique_id") == self.unique_id


def upsert_config_entries(storage: Path, specs: Iterable[EntrySpec]) -> list[str]:
    """Create or update config entries of this integration; return their ids.

    The file follows HA 2025.4.4's ``ConfigEntryStore``
    (``homeassistant/config_entries.py``); entries of other domains are kept.
    """
    from homeassistant.config_entries import (
        STORAGE_KEY,
        STORAGE_VERSION,
        STORAGE_VERSION_MINOR,
    )

    path = storage / STORAGE_KEY
    now = datetime.now(UTC).isoformat()
    if path.exists():
        document = json.loads(path.read_text())
    else:
        document = {
            "version": STORAGE_VERSION,
            "minor_version": STORAGE_VERSION_MINOR,
            "key": STORAGE_KEY,
            "data": {"entries": []},
        }
    entries: list[dict[str, Any]] = document["data"]["entries"]
    version, minor = flow_versions()
    ids: list[str] = []
    for spec in specs:
        for entry in entries:
            if spec.matches(entry):
                entry["data"] = {**entry.get("data", {}), **spec.data}
                entry["unique_id"] = spec.unique_id
                if spec.replace_options:
                    entry["options"] = spec.options
                entry["options"] = {**spec.option_defaults, **entry.get("options", {})}
                entry["modified_at"] = now
                _upsert_subentries(entry, spec.subentries)
                break
        else:
            entry = {
                "created_at": now,
                "data": spec.data,
                "discovery_keys": {},
                "disabled_by": None,
                "domain": DOMAIN,
                "entry_id": uuid.uuid4().hex,
                "minor_version": minor,
                "modified_at": now,
                "options": {**spec.option_defaults, **spec.options},
                "pref_disable_new_entities": False,
                "pref_disable_polling": False,
                "source": "user",
                "subentries": [],
                "title": spec.title,
                "unique_id": spec.unique_id,
                "version": version,
            }
            _upsert_subentries(entry, spec.subentries)
            entries.append(entry)
        ids.append(str(entry["entry_id"]))
    write_json(path, document)
    return ids


def _upsert_subentries(
    entry: dict[str, Any], subentries: Iterable[Mapping[str, Any]]
) -> None:
    """Add or update ``subentries`` in stored ``entry`` (see :class:`EntrySpec`)."""
    stored: list[dict[str, Any]] = entry.setdefault("subentries", [])
    for wanted in subentries:
        for existing in stored:
            if (existing.get("subentry_type"), existing.get("unique_id")) == (
                wanted["subentry_type"],
                wanted["unique_id"],
            ):
                existing["data"] = {**existing.get("data", {}), **wanted["data"]}
                break
        else:
            stored.append(
                {
                    "data": dict(wanted["data"]),
                    "subentry_id": uuid.uuid4().hex,
                    "subentry_type": wanted["subentry_type"],
                    "title": wanted["title"],
                    "unique_id": wanted["unique_id"],
                }
            )


def broker_entry(
    host: str,
    port: int,
    rules: Sequence[Mapping[str, Any]],
    *,
    title: str | None = None,
    require_admin: bool = False,
    username: str = "",
    password: str = "",
    client_id_prefix: str = "ha-mqtt-bridge",
    replace_options: bool = True,
    match: Callable[[Mapping[str, Any]], bool] | None = None,
) -> EntrySpec:
    """Return an "MQTT broker" entry (entry type ``mqtt_broker``, plain MQTT).

    ``rules`` is the options' topic ACL in mcpMQTT's ``topics`` format:
    ``[{"pattern": "demo/#", "permissions": ["read", "write"], "description": ...}]``.
    The unique id is the config flow's (``host:port:username``); ``match``
    finds an existing entry otherwise (see :class:`EntrySpec`).
    """
    data = {
        "entry_type": "mqtt_broker",
        "host": host,
        "port": port,
        "username": username,
        "password": password,
        "tls": False,
        "allow_self_signed": False,
        "ca_file": "",
        "client_id_prefix": client_id_prefix,
    }
    options = {
        "rules": [dict(rule) for rule in rules],
        "require_admin": require_admin,
        "include_assist_tools": False,
    }
    return EntrySpec(
        title=title or f"MQTT {host}:{port}",
        unique_id=f"{host}:{port}:{username}",
        data=data,
        options=options,
        replace_options=replace_options,
        match=match,
    )


#: The MCP Inspector pinned for Node 20 (``shared/reference/mcp-over-mqtt.md``
#: §6: 0.21.1 runs on Node 20 and has ``--header``; newer ones want Node 22).
INSPECTOR_PACKAGE = "@modelcontextprotocol/inspector@0.21.1"


def mcp_url(base: str, entry_id: str) -> str:
    """Return the MCP endpoint of broker entry ``entry_id`` on ``base``."""
    return f"{base}/api/{DOMAIN}/mcp/{entry_id}"


def inspector_command(url: str, token: str, *method: str) -> str:
    """Return a shell command running the MCP Inspector CLI against ``url``.

    ``token`` is put in as given (e.g. ``"$(cat config/mcp-token.txt)"``);
    ``method`` defaults to ``--method tools/list``.
    """
    args = " ".join(method) if method else "--method tools/list"
    return (
        f"npx -y {INSPECTOR_PACKAGE} --cli {url} --transport http "
        f'--header "Authorization: Bearer {token}" {args}'
    )


def prepare_minimal_config(
    config_dir: Path,
    port: int,
    entries: Iterable[EntrySpec],
    *,
    log_level: str = "info",
) -> list[str]:
    """Write a throw-away configuration directory; return the entries' ids."""
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "configuration.yaml").write_text(
        MINIMAL_CONFIGURATION_YAML.format(port=port, domain=DOMAIN, log_level=log_level)
    )
    warning = link_integration(config_dir)
    if warning:
        raise RuntimeError(warning)
    storage = config_dir / ".storage"
    storage.mkdir(exist_ok=True)
    write_onboarding(storage)
    return upsert_config_entries(storage, entries)


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def hass_command() -> list[str]:
    """Return the command that runs Home Assistant from this interpreter's venv."""
    hass = Path(sys.executable).parent / "hass"
    if hass.exists():
        # The console script keeps a restart (exec of sys.argv) working.
        return [str(hass)]
    return [sys.executable, "-m", "homeassistant"]


def child_env(**extra: str) -> dict[str, str]:
    """Return the environment for children: the repo root on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra)
    return env


def has_login(config_dir: Path, username: str) -> bool:
    """Whether ``config_dir`` already has homeassistant-provider credentials ``username``."""
    path = config_dir / ".storage" / AUTH_PROVIDER_KEY
    if not path.exists():
        return False
    users = json.loads(path.read_text()).get("data", {}).get("users", [])
    return any(user.get("username") == username for user in users)


def write_login(config_dir: Path, username: str, password: str) -> None:
    """Add the login ``username``/``password`` unless it exists (HA must be stopped).

    Writes ``.storage/auth_provider.homeassistant`` as HA 2025.4's
    ``homeassistant`` auth provider and ``hass --script auth add`` do (storage
    version 1: ``{"users": [{"username", "password": base64(bcrypt hash)}]}``),
    in a fraction of the time of that script. The first login through the login
    flow creates the user for it, as an administrator.
    """
    import bcrypt

    path = config_dir / ".storage" / AUTH_PROVIDER_KEY
    if path.exists():
        document = json.loads(path.read_text())
    else:
        document = {
            "version": 1,
            "minor_version": 1,
            "key": AUTH_PROVIDER_KEY,
            "data": {"users": []},
        }
    users: list[dict[str, str]] = document["data"]["users"]
    if any(user.get("username") == username for user in users):
        return
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=12))
    users.append({"username": username, "password": base64.b64encode(hashed).decode()})
    write_json(path, document)


class HassProcess:
    """``hass -c CONFIG_DIR --skip-pip`` as a subprocess in a session of its own.

    Output goes to ``log_path`` (``CONFIG_DIR/hass-console.log`` by default).
    :meth:`stop` sends SIGTERM to the process group, waits, then SIGKILLs it.
    """

    def __init__(
        self,
        config_dir: Path,
        *,
        port: int,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare (not start) Home Assistant on ``config_dir``, answering on ``port``."""
        self.config_dir = config_dir
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path or config_dir / "hass-console.log"
        self._env = dict(env) if env is not None else child_env()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start Home Assistant (returns at once; see :func:`wait_for_http`)."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *hass_command(),
                    "-c",
                    str(self.config_dir),
                    "--skip-pip",
                    "--log-no-color",
                ],
                cwd=REPO_ROOT,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop Home Assistant (SIGTERM, then SIGKILL after ``timeout``); idempotent."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                proc.wait()
        # Anything HA left in its group goes too.
        self._signal_group(signal.SIGKILL)
        return proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        """Return the last lines of the console log and of ``home-assistant.log``."""
        out = []
        for path in (self.log_path, self.config_dir / "home-assistant.log"):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(out)

    def __enter__(self) -> Self:
        """Start on entry."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop on exit."""
        self.stop()


# --------------------------------------------------------------------------
# Talking to a running Home Assistant
# --------------------------------------------------------------------------


async def http_answers(session: aiohttp.ClientSession, base: str) -> bool:
    """Return whether HA's HTTP server answers (any status) on ``base``.

    Asks for ``/manifest.json``, which needs no login: probing ``/api/`` would
    log an "invalid authentication" warning.
    """
    try:
        async with session.get(
            f"{base}/manifest.json", timeout=aiohttp.ClientTimeout(total=3)
        ):
            return True
    except (aiohttp.ClientError, TimeoutError):
        return False


async def wait_for_http(
    session: aiohttp.ClientSession,
    base: str,
    *,
    timeout: float,
    process: HassProcess | None = None,
) -> float:
    """Wait until HA answers on ``base``; return the seconds it took.

    Raises:
        RuntimeError: ``process`` exited, or ``timeout`` passed.

    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process is not None and not process.running:
            raise RuntimeError(
                f"Home Assistant exited ({process.proc and process.proc.returncode})"
                f"\n{process.log_tail()}"
            )
        if await http_answers(session, base):
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    tail = process.log_tail() if process is not None else ""
    raise RuntimeError(
        f"Home Assistant did not answer on {base} in {timeout:g} s\n{tail}"
    )


async def login(
    session: aiohttp.ClientSession, base: str, username: str, password: str
) -> str:
    """Log in through HA's login flow; return a (30-minute) access token.

    The first login creates the user for credentials that ``hass --script
    auth`` made; such a user is an administrator.

    Raises:
        RuntimeError: the credentials were refused.
        aiohttp.ClientResponseError: an HTTP error.

    """
    client_id = f"{base}/"
    async with session.post(
        f"{base}/auth/login_flow",
        json={
            "client_id": client_id,
            "handler": ["homeassistant", None],
            "redirect_uri": f"{base}/?auth_callback=1",
        },
    ) as resp:
        resp.raise_for_status()
        flow = await resp.json()
    async with session.post(
        f"{base}/auth/login_flow/{flow['flow_id']}",
        json={"client_id": client_id, "username": username, "password": password},
    ) as resp:
        resp.raise_for_status()
        result = await resp.json()
    if result.get("type") != "create_entry":
        raise RuntimeError(f"login as {username} failed: {result}")
    async with session.post(
        f"{base}/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": result["result"],
            "client_id": client_id,
        },
    ) as resp:
        resp.raise_for_status()
        token = await resp.json()
    return str(token["access_token"])


class HassWebSocketError(RuntimeError):
    """A websocket command failed (``success: false``)."""


class HassWebSocket:
    """An authenticated connection to ``/api/websocket`` (async context manager).

    :meth:`call` sends a command and returns its result; events of
    subscriptions (:meth:`subscribe_events`) are queued for :meth:`next_event`.
    """

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        """Prepare a connection to ``base`` authenticated with ``token``."""
        self._session = session
        self._url = f"{base.replace('http', 'ws', 1)}/api/websocket"
        self._token = token
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 1
        self._events: list[dict[str, Any]] = []

    async def __aenter__(self) -> Self:
        """Connect and authenticate.

        Raises:
            HassWebSocketError: the token was refused.

        """
        self._ws = await self._session.ws_connect(self._url)
        hello = await self._ws.receive_json()
        if hello.get("type") != "auth_required":
            raise HassWebSocketError(f"unexpected greeting {hello}")
        await self._ws.send_json({"type": "auth", "access_token": self._token})
        answer = await self._ws.receive_json()
        if answer.get("type") != "auth_ok":
            await self._ws.close()
            raise HassWebSocketError(f"websocket authentication failed: {answer}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the connection."""
        if self._ws is not None:
            await self._ws.close()

    async def _receive(self) -> dict[str, Any]:
        assert self._ws is not None, "use 'async with'"
        msg: dict[str, Any] = await self._ws.receive_json()
        if msg.get("type") == "event":
            self._events.append(msg["event"])
        return msg

    async def call(self, command: str, **fields: Any) -> Any:
        """Send one command and return its ``result``.

        Raises:
            HassWebSocketError: the command failed.

        """
        assert self._ws is not None, "use 'async with'"
        msg_id = self._next_id
        self._next_id += 1
        await self._ws.send_json({"id": msg_id, "type": command, **fields})
        while True:
            msg = await self._receive()
            if msg.get("id") != msg_id or msg.get("type") != "result":
                continue
            if not msg.get("success"):
                raise HassWebSocketError(f"{command}: {msg.get('error')}")
            return msg.get("result")

    async def subscribe_events(self, event_type: str) -> None:
        """Subscribe to bus events of ``event_type`` (see :meth:`next_event`)."""
        await self.call("subscribe_events", event_type=event_type)

    async def next_event(self, timeout: float = 5.0) -> dict[str, Any]:
        """Return the oldest event not returned yet (``event_type``, ``data``, ...).

        Raises:
            TimeoutError: no event within ``timeout`` seconds.

        """
        async with asyncio.timeout(timeout):
            while not self._events:
                await self._receive()
        return self._events.pop(0)


async def create_long_lived_token(
    session: aiohttp.ClientSession,
    base: str,
    access_token: str,
    *,
    client_name: str,
    lifespan_days: int = 3650,
) -> str:
    """Create a long-lived access token for the user of ``access_token``."""
    async with HassWebSocket(session, base, access_token) as ws:
        return str(
            await ws.call(
                "auth/long_lived_access_token",
                client_name=client_name,
                lifespan=lifespan_days,
            )
        )


async def create_user(
    session: aiohttp.ClientSession,
    base: str,
    admin_token: str,
    *,
    name: str,
    username: str,
    password: str,
    admin: bool = False,
) -> str:
    """Create a user with a login (as the UI's "Add user" does); return its id.

    A non-administrator is in the ``system-users`` group.
    """
    async with HassWebSocket(session, base, admin_token) as ws:
        created = await ws.call(
            "config/auth/create",
            name=name,
            group_ids=["system-admin" if admin else "system-users"],
            local_only=False,
        )
        user_id = str(created["user"]["id"])
        await ws.call(
            "config/auth_provider/homeassistant/create",
            user_id=user_id,
            username=username,
            password=password,
        )
    return user_id


async def token_works(session: aiohttp.ClientSession, base: str, token: str) -> bool:
    """Whether ``token`` is accepted by ``GET /api/`` (False on 401 or no answer)."""
    try:
        async with session.get(
            f"{base}/api/",
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=5),
        ) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def get_json(session: aiohttp.ClientSession, url: str, token: str) -> Any:
    """GET ``url`` with a bearer token and return the JSON body."""
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        resp.raise_for_status()
        return await resp.json()


async def entry_states(
    session: aiohttp.ClientSession, base: str, token: str
) -> dict[str, tuple[str, str | None]]:
    """Return ``{entry_id: (state, reason)}`` of this integration's entries."""
    entries = await get_json(
        session, f"{base}/api/config/config_entries/entry?domain={DOMAIN}", token
    )
    return {e["entry_id"]: (e["state"], e.get("reason")) for e in entries}


async def wait_for_entries(
    session: aiohttp.ClientSession,
    base: str,
    token: str,
    entry_ids: Iterable[str],
    *,
    timeout: float,
) -> dict[str, tuple[str, str | None]]:
    """Wait until every entry in ``entry_ids`` is loaded (or cannot become so).

    Returns the last states seen; the caller checks them.
    """
    wanted = set(entry_ids)
    deadline = time.monotonic() + timeout
    states: dict[str, tuple[str, str | None]] = {}
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            states = await entry_states(session, base, token)
            mine = [states.get(e, ("unknown", None))[0] for e in wanted]
            if all(s == "loaded" for s in mine):
                return states
            if any(s in FAILED_STATES for s in mine):
                core = await get_json(session, f"{base}/api/config", token)
                if core.get("state") == "RUNNING":
                    return states
        if time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.25)


def integration_log_lines(log_path: Path, limit: int = 40) -> list[str]:
    """Return HA log records about this integration or at ERROR, newest last.

    A record's continuation lines (a traceback) are kept with it.
    """
    if not log_path.exists():
        return []
    lines: list[str] = []
    keep = False
    for line in log_path.read_text(errors="replace").splitlines():
        if line[:2].isdigit():  # "2026-11-21 06:27:32.094 LEVEL ..." starts a record
            keep = DOMAIN in line or " ERROR " in line or " CRITICAL " in line
        if keep:
            lines.append(line)
    return lines[-limit:]


@contextlib.asynccontextmanager
async def mcp_session(url: str, token: str) -> AsyncIterator[ClientSession]:
    """An initialized ``mcp`` client session over Streamable HTTP with ``token``."""
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        streamablehttp_client(url, headers=headers) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session
