"""The gateway service: Flower strategies round after round over MQTT, checked replies, a model lineage, ledger records.

`MqttGrid` implements `flwr.serverapp.Grid` over MQTT, so any Flower
Message-API strategy runs unchanged; the round engine (engine.py) runs it one
round at a time for as long as the gateway runs. service.py says how the
parts fit together.
"""
