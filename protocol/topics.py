"""MQTT topic names. Ids are lowercase hex, so they never contain '/', '+' or '#'.

    starling/<gw>/model/<digest-hex>   retained, signed model releases
    starling/<gw>/model/delta/<digest-hex>  retained, signed delta from the release before to that one
    starling/<gw>/mcu/latest           retained, signed int8 TFLite Micro export of the latest release
    starling/<gw>/keys                 retained, the gateway's key rotations signed by the root key
    starling/<gw>/members              retained, the city's root-signed membership vertices (protocol/membership.py)
    starling/<gw>/task/<device>        signed tasks for one device
    starling/<gw>/reply/<device>       signed replies from one device
    starling/<gw>/receipt/<device>     signed receipts for one device
    starling/<gw>/enroll/<device>      signed enrollment requests
    starling/<gw>/online/<device>      retained "1"/"0"; "0" is the device's MQTT last will
    starling/<gw>/status               retained JSON status of the gateway
    starling/<gw>/status/device/<id>   retained JSON per device: last seen, accepted, rejected by reason
    starling/blobs/want/<holder>       a request to that gateway for blobs by digest (protocol/blob_messages.py)
    starling/blobs/give/<requester>    the answer, for the requester alone (an ACL can make it so): chunks, or why not

Under `starling/blobs/` the segment after `want`/`give` is a node id (a gateway's, or an auditor's);
"blobs" is never a gateway id (ids are hex), so these never collide with `starling/<gw>/...`.
"""

ROOT = "starling"


def model(gateway: str, digest_hex: str) -> str:
    return f"{ROOT}/{gateway}/model/{digest_hex}"


DELTA = "delta"  # never a digest (those are hex): under model/, so a broker ACL for model/# covers it


def model_delta(gateway: str, digest_hex: str) -> str:
    """The delta that rebuilds model `digest_hex` from the release before it."""
    return f"{ROOT}/{gateway}/model/{DELTA}/{digest_hex}"


def mcu(gateway: str) -> str:
    return f"{ROOT}/{gateway}/mcu/latest"


def keys(gateway: str) -> str:
    return f"{ROOT}/{gateway}/keys"


def members(gateway: str) -> str:
    return f"{ROOT}/{gateway}/members"


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


def blob_want(holder: str) -> str:
    return f"{ROOT}/blobs/want/{holder}"


def blob_give(requester: str) -> str:
    return f"{ROOT}/blobs/give/{requester}"


def blob_push(sender: str) -> str:
    """Where a gateway pushes a blob every member will want (its city offer's model), once, to all."""
    return f"{ROOT}/blobs/push/{sender}"


BLOB_PUSHES = f"{ROOT}/blobs/push/+"


def device_of(topic: str) -> str:
    """The last segment of a per-device topic."""
    return topic.rsplit("/", 1)[-1]
