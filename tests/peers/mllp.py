"""A real MLLP listener on loopback, standing in for the hospital's interface engine.

It reads MLLP frames from TCP connections, parses and validates each message with
hl7apy (HL7 v2.5.1 structure and field types), stores it once per MSH-10 (as an
engine that deduplicates on the control id), and answers with an ACK built with
hl7apy: AA when the message is valid, AR with an ERR segment when it is not.
Tests script faults per received message: ``"AE"`` (application error, the
sender must retry), ``"AR"`` (reject), ``"drop"`` (store the message, then close
the connection without an ACK, as a crash between commit and answer would).
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message

from integration.hl7v2.message import parse

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


@dataclass
class Received:
    control_id: str
    message_type: str
    er7: str
    message: Any                      # the parsed hl7apy Message


@dataclass
class ListenerState:
    faults: list[str] = field(default_factory=list)
    accepted: dict[str, Received] = field(default_factory=dict)     # MSH-10 -> the first copy
    duplicates: int = 0
    frames: int = 0
    answers: list[str] = field(default_factory=list)                # MSA-1 (or "drop") per frame
    invalid: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def ack(message_er7: str, code: str, text: str = "", error: str | None = None) -> str:
    """An ACK for the message (hl7apy), MSA-1 ``code``; ERR with HL7 table 0357 code when ``error``."""
    fields = message_er7.split("\r", 1)[0].split("|")

    def get(i: int) -> str:
        return fields[i] if len(fields) > i else ""
    msg = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    msg.msh.msh_3, msg.msh.msh_4 = get(4) or "ENGINE", get(5) or "HOSPITAL"
    msg.msh.msh_5, msg.msh.msh_6 = get(2) or "SENDER", get(3) or "SENDER"
    msg.msh.msh_9 = "ACK^" + (get(8).split("^")[1] if "^" in get(8) else "R01") + "^ACK"
    msg.msh.msh_10 = "ACK" + get(9)[:17]
    msg.msh.msh_11, msg.msh.msh_12 = "P", "2.5.1"
    msa = msg.add_segment("MSA")
    msa.msa_1, msa.msa_2 = code, get(9) or "UNKNOWN"
    if text:
        msa.msa_3 = text.replace("|", "/").replace("^", " ")[:80]
    if error:
        err = msg.add_segment("ERR")
        err.err_3 = "207^Application internal error^HL70357" if code != "AR" else "100^Segment sequence error^HL70357"
        err.err_4 = "E"
        err.err_8 = error.replace("|", "/").replace("^", " ").replace("~", " ").replace("&", " ")[:250]
    msg.validate()
    return msg.to_er7()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        state: ListenerState = self.server.state  # type: ignore[attr-defined]
        buf = b""
        while True:
            try:
                chunk = self.request.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while FS + CR in buf:
                raw, buf = buf.split(FS + CR, 1)
                er7 = raw[raw.find(VT) + 1:].decode("utf-8", errors="replace")
                if not self._answer(state, er7):
                    self.request.close()
                    return

    def _answer(self, state: ListenerState, er7: str) -> bool:
        with state.lock:
            state.frames += 1
            fault = state.faults.pop(0) if state.faults else None
        try:
            message = parse(er7)                 # hl7apy: structure and field types of v2.5.1
        except Exception as exc:  # noqa: BLE001 - any parse/validation error is an AR
            with state.lock:
                state.invalid.append(str(exc))
                state.answers.append("AR")
            self.request.sendall(VT + ack(er7, "AR", "invalid message", str(exc)).encode() + FS + CR)
            return True
        if fault in ("AE", "AR"):
            with state.lock:
                state.answers.append(fault)
            text = "engine busy: try again" if fault == "AE" else "refused by the engine"
            self.request.sendall(VT + ack(er7, fault, text, text).encode() + FS + CR)
            return True
        control = message.msh.msh_10.value
        with state.lock:
            if control in state.accepted:
                state.duplicates += 1
            else:
                state.accepted[control] = Received(control, message.msh.msh_9.value, er7, message)
            state.answers.append("drop" if fault == "drop" else "AA")
        if fault == "drop":
            return False                          # committed, but the sender never hears about it
        self.request.sendall(VT + ack(er7, "AA").encode() + FS + CR)
        return True


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class MllpListener:
    host: str
    port: int
    state: ListenerState

    def fault(self, *actions: str) -> None:
        with self.state.lock:
            self.state.faults.extend(actions)

    @property
    def accepted(self) -> dict[str, Received]:
        return self.state.accepted


@contextmanager
def mllp_listener(port: int = 0) -> Iterator[MllpListener]:
    server = _Server(("127.0.0.1", port), _Handler)
    server.state = ListenerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name="mllp-listener", daemon=True)
    thread.start()
    try:
        yield MllpListener("127.0.0.1", server.server_address[1], server.state)  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
