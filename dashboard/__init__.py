"""The operators' web dashboard, fed from the gateways' MQTT status topics.

    starling-dashboard --broker mqtts://broker.city.example:8883 --tls-ca ca.crt \\
        --username dashboard --password-file dashboard.password --listen 127.0.0.1:8080

Parts, each in its own module:

    fleet.py    the in-memory model of the fleet, built from status messages (never raises on input)
    alerts.py   the alert rules, one function each, evaluated on the model
    chart.py    the small inline SVG accuracy chart
    feed.py     the MQTT subscription (mqttlink), with TLS and credentials
    server.py   the HTTP server: the page, a JSON snapshot and a server-sent-events stream
    page.py     the page itself (HTML, CSS, JS as constants: no package data to install)
    cli.py      `starling-dashboard`

Imports only `protocol`, `mqttlink` (paho-mqtt) and the standard library (see DESIGN.md's layout).
"""
