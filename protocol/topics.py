"""MQTT topic names. Ids are lowercase hex, so they never contain '/', '+' or '#'.

    starling/<gw>/model/<digest-hex>   retained, signed model releases
    starling/<gw>/mcu/latest           retained, signed int8 TFLite Micro export of the latest release
    starling/<gw>/keys                 retained, the gateway's key rotations signed by the root key
    starling/<gw>/task/<device>        signed tasks for one device
    starling/<gw>/reply/<device>       signed replies from one device
    starling/<gw>/receipt/<device>     signed receipts for one device
    starling/<gw>/enroll/<device>      signed enrollment requests
    starling/<gw>/online/<device>      retained "1"/"0"; "0" is the device's MQTT last will
    starling/<gw>/status               retained JSON status of the gateway
    starling/<gw>/status/device/<id>   retained JSON per device: last seen, accepted, rejected by reason
"""

ROOT = "starling"


def model(gateway: str, digest_hex: str) -> str:
    return f"{ROOT}/{gateway}/model/{digest_hex}"


def mcu(gateway: str) -> str:
    return f"{ROOT}/{gateway}/mcu/latest"


def keys(gateway: str) -> str:
    return f"{ROOT}/{gateway}/keys"


def task(gateway: str, device: str) -> str:
    return f"{ROOT}/{gateway}/task/{device}"


def reply(gateway: str, device: str) -> str:
    return f"{ROOT}/{gateway}/reply/{device}"


def receipt(gateway: str, device: str) -> str:
    return f"{ROOT}/{gateway}/receipt/{device}"


def enroll(gateway: str, device: str) -> str:
    return f"{ROOT}/{gateway}/enroll/{device}"


def online(gateway: str, device: str) -> str:
    return f"{ROOT}/{gateway}/online/{device}"


def status(gateway: str) -> str:
    return f"{ROOT}/{gateway}/status"


def device_status(gateway: str, device: str) -> str:
    return f"{ROOT}/{gateway}/status/device/{device}"


def device_of(topic: str) -> str:
    """The last segment of a per-device topic."""
    return topic.rsplit("/", 1)[-1]
