"""One MQTT connection object for every Starling role.

    from mqttlink import Connection, ConnectionOptions, Will

    options = ConnectionOptions("gw-1234", "127.0.0.1", 1883, subscriptions=(("starling/+/status", 1),))
    with Connection(options) as conn:           # connects (bounded wait), keeps reconnecting until closed
        conn.publish("starling/x/status", b"{}", retain=True)
        topic, payload, at = conn.inbox.get()  # what arrived, queued by paho's thread

`Connection` owns a connection's whole life: connect and reconnect with
backoff, TLS and credentials (`protocol.transport.BrokerAuth`), the last
will, a "birth" message published on every connect, and the subscriptions,
which it makes again on every connect (a broker restarted without
persistence forgot them). Its paho callbacks only convert and queue.

Imports only paho-mqtt and `protocol`: the agent (512 MB devices), the
dashboard, the gateway and the emulator all use it.
"""

from .connection import ConnectError, Connection, ConnectionOptions, Message, MqttError, Will

__all__ = ["Connection", "ConnectionOptions", "ConnectError", "Message", "MqttError", "Will"]
