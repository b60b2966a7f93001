"""The device service: verify tasks, train on local windows, send signed int8 updates.

Runs on 512 MB devices, so it imports only protocol, mqttlink (paho-mqtt), numpy
and a TFLite interpreter (never flwr, sqlite_utils or TensorFlow).
"""
