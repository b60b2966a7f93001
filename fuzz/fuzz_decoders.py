"""Coverage-guided fuzzing (atheris / libFuzzer) of the decoders every network message goes through.

    pip install atheris
    python fuzz/fuzz_decoders.py -runs=100000                       # from the repository root
    python fuzz/fuzz_decoders.py -max_total_time=600 fuzz/work tests/hostile/corpus/*/   # seeded, kept corpus

Each input goes through the canonical CBOR decoder and every decoder built on
it: envelopes (and their message bodies), ledger vertices, update and model
attachments, vouchers. Allowed outcomes: a value, or a `ProtocolError` (the
one exception family for bad input). Anything else is a finding: libFuzzer
stops and writes the input to crash-<sha1>. Two more properties are checked:
whatever `cbor.loads` accepts re-encodes to the very same bytes (canonical
means one encoding per value), and a decoded envelope can be verified
without raising anything but a `ProtocolError`.

`python fuzz/fuzz_decoders.py --self-test` runs the same checks without
atheris over the replay corpus and some random inputs (a smoke test of the
harness itself). Not part of CI: see fuzz/README.md.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _imports():
    from ledger.vertex import Vertex
    from protocol import cbor, envelope, schemas
    from protocol.errors import ProtocolError
    from protocol.vouchers import Voucher

    return cbor, envelope, schemas, ProtocolError, Vertex, Voucher


if "--self-test" in sys.argv or __name__ != "__main__":
    cbor, envelope, schemas, ProtocolError, Vertex, Voucher = _imports()
else:
    import atheris

    with atheris.instrument_imports(include=["protocol", "ledger"]):
        cbor, envelope, schemas, ProtocolError, Vertex, Voucher = _imports()

BODIES = {"task": schemas.Task, "reply": schemas.Reply, "receipt": schemas.Receipt, "model": schemas.ModelRelease,
          "mcu": schemas.McuRelease, "enroll": schemas.EnrollRequest}


def test_one_input(data: bytes) -> None:
    try:
        value = cbor.loads(data)
    except ProtocolError:
        value = None
    else:
        assert cbor.dumps(value) == data, "canonical CBOR decoded to a value with another encoding"
    try:
        env = envelope.decode(data)
    except ProtocolError:
        env = None
    if env is not None:
        for step in (lambda: BODIES[env.type].from_body(env.body), env.verify, lambda: env.digest):
            try:
                step()
            except ProtocolError:
                pass
        if env.attachment is not None:
            test_attachment(env.attachment)
    for decode in (Vertex.decode, Voucher.decode):
        try:
            decode(data)
        except ProtocolError:
            pass
    test_attachment(data)


def test_attachment(data: bytes) -> None:
    for decode in (schemas.check_update, schemas.decode_update, schemas.decode_model):
        try:
            decode(data)
        except ProtocolError:
            pass


def self_test() -> None:
    inputs = [p.read_bytes() for p in sorted((ROOT / "tests/hostile/corpus").rglob("*.cbor"))]
    rng = random.Random(0)
    for seed in list(inputs):
        for _ in range(200):
            data = bytearray(seed)
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            inputs.append(bytes(data[: rng.randrange(len(data) + 1)] if rng.random() < 0.2 else data))
    for data in inputs:
        test_one_input(data)
    print(f"self-test: {len(inputs)} inputs, no finding")


if __name__ == "__main__":
    if "--self-test" in sys.argv:
        self_test()
    else:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
