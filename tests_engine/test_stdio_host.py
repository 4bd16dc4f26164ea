"""StdioHost: a real stdio MCP server child per session, driven by a stock mcp ClientSession."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
import logging
import os
import sys
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import ClientSession, types
from mcp.shared.message import SessionMessage
from mqtt_bridge_engine import stdio_host
from mqtt_bridge_engine.backoff import Backoff
from mqtt_bridge_engine.stdio_host import (
    EXITED_MESSAGE,
    StdioHost,
    StdioServerConfig,
)
from pydantic import TypeAdapter
import pytest

from .common import FAST, echo_host as _host


def _streams() -> tuple[
    MemoryObjectSendStream[SessionMessage | Exception],
    MemoryObjectReceiveStream[SessionMessage | Exception],
    MemoryObjectSendStream[SessionMessage],
    MemoryObjectReceiveStream[SessionMessage],
]:
    """``(to_host, host_read, host_write, from_host)``: a session's two streams, 16 deep."""
    to_host, host_read = anyio.create_memory_object_stream[SessionMessage | Exception](
        16
    )
    host_write, from_host = anyio.create_memory_object_stream[SessionMessage](16)
    return to_host, host_read, host_write, from_host


def _text(result: Any) -> str:
    return str(result.content[0].text)


_ADAPTER: TypeAdapter[Any] = TypeAdapter(types.JSONRPCMessage)


def _raw(body: dict[str, Any]) -> SessionMessage:
    return SessionMessage(_ADAPTER.validate_python({"jsonrpc": "2.0", **body}))


def _body(message: SessionMessage) -> dict[str, Any]:
    body: dict[str, Any] = message.message.model_dump(
        by_alias=True, mode="json", exclude_none=True
    )
    return body


INITIALIZE = {
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@asynccontextmanager
async def _client(
    host: StdioHost, client_id: str = "client-1", **kwargs: Any
) -> AsyncIterator[ClientSession]:
    """A ClientSession whose transport is ``host.serve_session``; the session ends on exit."""
    to_host, host_read, host_write, from_host = _streams()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.serve_session, client_id, host_read, host_write)
            async with ClientSession(from_host, to_host, **kwargs) as session:
                await session.initialize()
                yield session
            to_host.close()  # the client went away
    from_host.close()


async def test_one_session_passes_everything_through(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tools, a logging notification, stderr (rate-limited), minimal environment, clean stop."""
    caplog.set_level(logging.WARNING, logger="mqtt_bridge_engine.stdio_host")
    monkeypatch.setenv("MQTT_BRIDGE_TEST_SECRET", "do-not-leak")
    received: list[Any] = []

    async def logging_callback(params: Any) -> None:
        received.append(params.data)

    async def list_roots_callback(context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri="file:///srv/data")])  # type: ignore[arg-type]

    host = _host(env={"CONFIGURED": "yes"}, stderr_lines_per_minute=3)
    async with _client(
        host,
        logging_callback=logging_callback,
        list_roots_callback=list_roots_callback,
    ) as session:
        tools = await session.list_tools()
        assert {"echo", "sleep", "die"} <= {tool.name for tool in tools.tools}
        assert _text(await session.call_tool("echo", {"text": "hello"})) == "hello"
        pid = int(_text(await session.call_tool("pid", {})))
        assert _alive(pid)
        assert host.stats.running == 1
        assert host.stats.sessions == 1

        assert _text(await session.call_tool("log", {"text": "note"})) == "logged"
        assert received == ["note"]

        async def env(name: str) -> str:
            return _text(await session.call_tool("env", {"name": name}))

        assert await env("MQTT_BRIDGE_TEST_SECRET") == "<unset>"
        assert await env("CONFIGURED") == "yes"
        assert await env("PATH") == os.environ["PATH"]

        # A server->client request and its answer.
        assert _text(await session.call_tool("roots", {})) == "file:///srv/data"
        # A stdout line that is not JSON-RPC is skipped; the session goes on.
        assert _text(await session.call_tool("garbage", {})) == "written"
        await session.call_tool("stderr", {"lines": 10, "tail": "no newline"})
    assert not _alive(pid)
    assert host.stats.running == 0
    assert host.stats.sessions == 0
    assert host.stats.sessions_started == 1
    assert host.stats.requests == 11  # initialize, tools/list, 9 x tools/call
    assert host.stats.errors == 0
    lines = [r.getMessage() for r in caplog.records if "stderr" in r.getMessage()]
    # mcp 2.x points fd 1 at stderr while serving: there the garbage line is logged.
    noted = [line for line in lines if "not JSON-RPC" in line]
    logged = [line for line in lines if "stderr line" in line]
    assert len(noted) + len(logged) == 3
    assert logged == [
        f"echo [client-1] stderr: stderr line {n}" for n in range(len(logged))
    ]
    assert lines[-1] == (
        f"echo [client-1] stderr: {8 + len(noted)} lines suppressed (limit 3 per minute)"
    )


async def test_two_sessions_get_two_children() -> None:
    host = _host()
    async with _client(host, "a") as first, _client(host, "b") as second:
        assert host.stats.running == 2
        pids = {int(_text(await s.call_tool("pid", {}))) for s in (first, second)}
        assert len(pids) == 2
        async with anyio.create_task_group() as tg:
            results: dict[str, str] = {}

            async def call(session: ClientSession, text: str) -> None:
                results[text] = _text(await session.call_tool("echo", {"text": text}))

            for n in range(10):
                tg.start_soon(call, first, f"a{n}")
                tg.start_soon(call, second, f"b{n}")
        assert results == {key: key for key in results}
        assert len(results) == 20
    assert not any(_alive(pid) for pid in pids)
    assert host.stats.sessions_started == 2


async def test_child_death_fails_inflight_and_restarts() -> None:
    host = _host()
    errors: list[str] = []
    async with _client(host) as session:
        first_pid = int(_text(await session.call_tool("pid", {})))

        async def slow() -> None:
            with pytest.raises(Exception, match=EXITED_MESSAGE) as err:
                await session.call_tool("sleep", {"seconds": 30})
            errors.append(str(err.value))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await anyio.sleep(0.2)  # the sleep request is in flight
                with pytest.raises(Exception, match=EXITED_MESSAGE):
                    await session.call_tool("die", {})
        assert len(errors) == 1
        # The next call waits for the restarted, re-initialized child.
        assert _text(await session.call_tool("echo", {"text": "again"})) == "again"
        second_pid = int(_text(await session.call_tool("pid", {})))
        assert second_pid != first_pid
        assert not _alive(first_pid)
        assert host.stats.restarts == 1
        assert host.stats.errors == 2
        assert host.stats.running == 1
    assert not _alive(second_pid)


async def test_command_that_cannot_start_answers_errors() -> None:
    host = StdioHost(
        StdioServerConfig("/nonexistent/mcp-server"),
        name="missing",
        restart_backoff=FAST,
    )
    to_host, host_read, host_write, from_host = _streams()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.serve_session, "c", host_read, host_write)
            async with ClientSession(from_host, to_host) as session:
                with pytest.raises(Exception, match=EXITED_MESSAGE):
                    await session.initialize()
            to_host.close()
    from_host.close()
    assert host.stats.errors >= 2  # the start failure and the answer
    assert host.stats.running == 0
    assert host.stats.sessions == 0


async def test_ping_is_answered_while_no_child_is_up() -> None:
    """A health ping does not wait for a child that is restarting (or cannot start)."""
    host = StdioHost(
        StdioServerConfig("/nonexistent/mcp-server"),
        name="missing",
        restart_backoff=Backoff(base=5.0, cap=5.0),
    )
    to_host, host_read, host_write, from_host = _streams()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.serve_session, "c", host_read, host_write)
            await to_host.send(_raw(INITIALIZE))
            assert _body(await from_host.receive())["error"]["message"] == (
                EXITED_MESSAGE
            )
            await to_host.send(_raw({"id": "p1", "method": "ping"}))
            assert _body(await from_host.receive()) == {
                "jsonrpc": "2.0",
                "id": "p1",
                "result": {},
            }
            # nobody reads any more: the session ends at the next ping
            from_host.close()
            await to_host.send(_raw({"id": "p2", "method": "ping"}))
    to_host.close()
    assert host.stats.requests == 3
    assert host.stats.sessions == 0
    assert host.stats.running == 0


async def test_cancelled_session_stops_the_child() -> None:
    host = _host()
    to_host, host_read, host_write, from_host = _streams()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.serve_session, "c", host_read, host_write)
            async with ClientSession(from_host, to_host) as session:
                await session.initialize()
                pid = int(_text(await session.call_tool("pid", {})))
                tg.cancel_scope.cancel()  # as McpMqttServer cancels a session's handler
    to_host.close()
    from_host.close()
    assert not _alive(pid)
    assert host.stats.running == 0
    assert host.stats.sessions == 0


async def test_raw_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transport errors, cancellations, stray responses, error answers, replay with a fresh id."""
    monkeypatch.setattr(stdio_host, "HEALTHY_AFTER", 0.0)
    host = _host()
    to_host, host_read, host_write, from_host = _streams()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.serve_session, "raw", host_read, host_write)
            await to_host.send(_raw(INITIALIZE))
            assert _body(await from_host.receive())["id"] == 0
            await to_host.send(_raw({"method": "notifications/initialized"}))
            await to_host.send(ValueError("transport trouble"))  # logged, skipped
            # A response to a request the server never sent is dropped.
            await to_host.send(_raw({"id": "nobody-asked", "result": {}}))
            # A cancelled request is not answered by the host either.
            await to_host.send(
                _raw(
                    {
                        "id": 1,
                        "method": "tools/call",
                        "params": {"name": "sleep", "arguments": {"seconds": 30}},
                    }
                )
            )
            await to_host.send(
                _raw(
                    {
                        "method": "notifications/cancelled",
                        "params": {"requestId": 1, "reason": "test"},
                    }
                )
            )
            # The child's own error answers pass through and are counted.
            await to_host.send(_raw({"id": 2, "method": "no/such/method"}))
            answer = _body(await from_host.receive())
            assert answer["id"] == 2
            assert answer["error"]["code"] in {-32601, -32602}  # 1.x: -32602
            assert host.stats.errors == 1
            # Kill the child: only request 3 is answered by the host.
            await to_host.send(
                _raw({"id": 3, "method": "tools/call", "params": {"name": "die"}})
            )
            answer = _body(await from_host.receive())
            assert answer == {
                "jsonrpc": "2.0",
                "id": 3,
                "error": {"code": -32603, "message": EXITED_MESSAGE},
            }
            # While the child restarts, notifications are dropped and requests wait.
            await to_host.send(_raw({"method": "notifications/roots/list_changed"}))
            await to_host.send(_raw({"id": 4, "method": "tools/list"}))
            answer = _body(await from_host.receive())
            assert answer["id"] == 4
            assert "tools" in answer["result"]
            assert host.stats.restarts == 1
            to_host.close()
    from_host.close()
    assert host.stats.running == 0


async def test_child_exiting_during_replay_is_restarted_again() -> None:
    """A child that exits on its first input: initialize fails, every replay fails."""
    host = StdioHost(
        StdioServerConfig(sys.executable, ("-c", "import sys; sys.stdin.readline()")),
        name="quitter",
        restart_backoff=FAST,
    )
    to_host, host_read, host_write, from_host = _streams()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.serve_session, "c", host_read, host_write)
            await to_host.send(_raw(INITIALIZE))
            answer = _body(await from_host.receive())
            assert answer["error"]["message"] == EXITED_MESSAGE
            while host.stats.restarts < 2:  # restarted, replay failed, restarted
                await anyio.sleep(0.01)
            to_host.close()
    from_host.close()
    assert host.stats.running == 0


async def test_session_ending_while_the_child_starts() -> None:
    host = StdioHost(StdioServerConfig("cat"), name="cat")
    to_host, host_read, host_write, from_host = _streams()
    to_host.close()
    with anyio.fail_after(5):
        await host.serve_session("c", host_read, host_write)
    from_host.close()
    assert host.stats.running == 0
    assert host.stats.sessions == 0


def test_stderr_rate_limit_window(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mqtt_bridge_engine.stdio_host")
    now = [1000.0]
    monkeypatch.setattr(stdio_host.time, "monotonic", lambda: now[0])
    log = stdio_host._StderrLog("srv", "c", 1)
    log.feed(b"one\ntwo\n")
    now[0] += 61.0
    log.feed(b"three\r\n")
    log.close()
    assert [r.getMessage() for r in caplog.records] == [
        "srv [c] stderr: one",
        "srv [c] stderr: 1 lines suppressed (limit 1 per minute)",
        "srv [c] stderr: three",
    ]


@pytest.mark.parametrize(
    ("command", "args"),
    [
        # The child answers (cat echoes the request back): its message finds no reader.
        ("cat", ()),
        # The child exits: the host's error answer finds no reader.
        (sys.executable, ("-c", "import sys; sys.stdin.readline()")),
    ],
)
async def test_session_ends_when_the_client_stops_reading(
    command: str, args: tuple[str, ...]
) -> None:
    host = StdioHost(
        StdioServerConfig(command, args), name="gone", restart_backoff=FAST
    )
    to_host, host_read, host_write, from_host = _streams()
    from_host.close()
    await to_host.send(_raw(INITIALIZE))
    with anyio.fail_after(5):
        await host.serve_session("c", host_read, host_write)
    to_host.close()
    assert host.stats.running == 0
    assert host.stats.restarts == 0
