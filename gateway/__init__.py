"""The round engine: Flower strategies over MQTT, checked replies, ledger records.

`MqttGrid` implements `flwr.serverapp.Grid` over MQTT, so any Flower
Message-API strategy runs unchanged through `strategy.start(grid=...)`.
"""
