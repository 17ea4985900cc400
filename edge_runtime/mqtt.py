"""One MQTT v5 connection as every RELED process uses it: reconnecting, re-subscribing, messages on a queue.

paho runs the network in its own thread; callers read :attr:`Link.inbox` from theirs, so all state
changes happen in one thread and need no locks. Subscriptions are renewed on every (re)connect, since
a broker restart forgets them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.errors import RELEDError
from edge_runtime.protocol import QOS

log = logging.getLogger(__name__)
INBOX_BYTES = 64 * 1024 * 1024  # received and not yet handled; 64 maximal rollout batches


@dataclass(frozen=True)
class BrokerAddress:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    ca_file: str | None = None  # set: TLS, server verified against this CA


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


class Inbox(queue.Queue[Message]):
    """Received messages, bounded in bytes: when the reader falls behind a flood, newer messages are dropped
    (counted) instead of growing the process. Nothing is lost for good: an unacknowledged rollout batch is sent
    again, a chunk request times out and is repeated, a retained message comes back at the next connect."""

    def __init__(self, max_bytes: int = INBOX_BYTES):
        super().__init__()
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0

    def _put(self, item: Message) -> None:  # queue.Queue calls these with its lock held
        self.bytes += len(item.payload)
        super()._put(item)

    def _get(self) -> Message:
        item = super()._get()
        self.bytes -= len(item.payload)
        return item

    def offer(self, message: Message) -> bool:
        """Queue ``message`` unless that would exceed the bound (one writer: paho's thread)."""
        if self.bytes + len(message.payload) > self.max_bytes:
            self.dropped += 1
            return False
        self.put_nowait(message)
        return True


def _no_delay(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
    """Send small messages at once: with Nagle's algorithm a second message waits for the peer's delayed ACK of
    the first (40 ms on Linux), which a hardware-in-the-loop decision cannot afford."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Link:
    """A connected client; ``on_connect`` callbacks run in paho's thread after subscriptions are renewed."""

    def __init__(self, address: BrokerAddress, client_id: str, subscriptions: list[str],
                 will: tuple[str, bytes] | None = None, on_connect: Callable[[], None] | None = None):
        self.address = address
        self.subscriptions = list(subscriptions)
        self.inbox = Inbox()
        self.connected = threading.Event()
        self.refused: str | None = None
        self._on_connect_hook = on_connect
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.username_pw_set(address.username, address.password)
        if address.ca_file:
            client.tls_set(ca_certs=address.ca_file)
        if will is not None:
            client.will_set(will[0], will[1], qos=QOS, retain=True)
        client.reconnect_delay_set(min_delay=0.2, max_delay=2)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_message = self._message
        client.on_socket_open = _no_delay
        self.client = client

    def connect(self) -> None:
        """Connect (and keep reconnecting) in the background; a controller must not wait for the broker."""
        self.client.connect_async(self.address.host, self.address.port, keepalive=10, clean_start=True)
        self.client.loop_start()

    def start(self, timeout: float = 10.0) -> Link:
        """Connect and wait; raises when the broker refuses us, fails TLS verification or stays unreachable."""
        self.connect()
        if not self.connected.wait(timeout):
            self.close()
            address = self.address
            where = f"could not connect to MQTT broker {address.host}:{address.port} as {address.username!r}"
            if (tls := self._tls_problem()) is not None:
                raise RELEDError(f"{where} (TLS verification failed: {tls}): the broker's certificate must come from "
                                 "the CA in ca_file and name this host (`broker start --tls-name`)")
            raise RELEDError(f"{where} ({self.refused or 'no answer'}): is it running, and are the credentials right?")
        return self

    def _tls_problem(self) -> str | None:
        """Why the broker's certificate fails verification, if it does: paho only ever reports no answer."""
        if not self.address.ca_file:
            return None
        try:
            context = ssl.create_default_context(cafile=self.address.ca_file)
            with socket.create_connection((self.address.host, self.address.port), timeout=5) as sock, \
                    context.wrap_socket(sock, server_hostname=self.address.host):
                return None
        except ssl.SSLCertVerificationError as exc:
            return exc.verify_message
        except (OSError, ssl.SSLError):  # unreachable, or not a verification problem: "no answer" says it
            return None

    def publish(self, topic: str, payload: bytes, retain: bool = False, qos: int = QOS,
                expiry: int | None = None) -> mqtt.MQTTMessageInfo:
        """``expiry``: seconds after which the broker drops the message, its retained copy included (MQTT v5)."""
        properties = None
        if expiry is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = expiry
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def subscribe(self, topic: str) -> None:
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
        self.client.subscribe(topic, qos=QOS)

    def unsubscribe(self, topic: str) -> None:
        if topic in self.subscriptions:
            self.subscriptions.remove(topic)
            self.client.unsubscribe(topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _connected(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                   properties: Properties | None) -> None:
        if reason.is_failure:
            self.refused = str(reason)
            log.warning("broker refused the connection: %s", reason)
            return
        for topic in self.subscriptions:
            client.subscribe(topic, qos=QOS)
        self.connected.set()
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _disconnected(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                      properties: Properties | None) -> None:
        self.connected.clear()
        log.info("disconnected from the broker (%s); reconnecting", reason)

    def _message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if not self.inbox.offer(Message(message.topic, bytes(message.payload), bool(message.retain))) \
                and self.inbox.dropped == 1:
            log.warning("messages arrive faster than they are handled: dropping them while %d bytes wait",
                        self.inbox.bytes)

