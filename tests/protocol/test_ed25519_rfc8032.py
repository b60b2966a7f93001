"""RFC 8032 section 7.1 Ed25519 test vectors against `protocol.keys`.

Each vector: the 32-byte secret seed, the public key it must derive, the
message and the exact (deterministic) signature.
"""

from __future__ import annotations

import hashlib

import pytest

from protocol import keys
from protocol.errors import BadSignature, KeyFileError, ProtocolError
from protocol.keys import Identity

_MSG_1024 = (
    "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98"
    "fa6e264bf09efe12ee50f8f54e9f77b1e355f6c50544e23fb1433ddf73be84d8"
    "79de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
    "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc"
    "1a858efcb8550ee3a5e1998bd177e93a7363c344fe6b199ee5d02e82d522c4fe"
    "ba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
    "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbef"
    "efd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d206be6cd9ec7"
    "aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
    "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2"
    "d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24"
    "554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
    "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc"
    "2732e69485bbc9c90bfbd62481d9089beccf80cfe2df16a2cf65bd92dd597b07"
    "07e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
    "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51a"
    "ddd3b75a2b1ae0784504df543af8969be3ea7082ff7fc9888c144da2af58429e"
    "c96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
    "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c"
    "42f58c30c04aafdb038dda0847dd988dcda6f3bfd15c4b4c4525004aa06eeff8"
    "ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
    "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08"
    "d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649"
    "de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
    "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a3"
    "2ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e"
    "6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
    "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b5"
    "0d334ba77c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa933a15ef1"
    "369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
    "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c"
    "0618983f8741c5ef68d3a101e8a3b8cac60c905c15fc910840b94c00a0b9d0"
)

# (name, secret key seed, public key, message, signature), all hex.
VECTORS = [
    (
        "TEST 1",
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "TEST 2",
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "TEST 3",
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    (
        "TEST 1024",
        "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
        "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
        _MSG_1024,
        "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350"
        "aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03",
    ),
    (
        "TEST SHA(abc)",
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
        "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
    ),
]

IDS = [v[0] for v in VECTORS]


def _decoded(vector):
    _, seed, public, message, signature = vector
    return bytes.fromhex(seed), bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_vector_messages_have_their_published_lengths():
    lengths = [len(_decoded(v)[2]) for v in VECTORS]
    assert lengths == [0, 1, 2, 1023, 64]


def test_sha_abc_vector_message_is_sha512_of_abc():
    assert _decoded(VECTORS[4])[2] == hashlib.sha512(b"abc").digest()


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_from_seed_derives_the_published_public_key(vector):
    seed, public, _, _ = _decoded(vector)
    assert Identity.from_seed(seed).public_key == public


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_sign_gives_exactly_the_published_signature(vector):
    seed, _, message, signature = _decoded(vector)
    identity = Identity.from_seed(seed)
    assert identity.sign(message) == signature
    # Ed25519 is deterministic: signing again gives the same bytes.
    assert identity.sign(message) == signature


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_verify_accepts_the_published_signature(vector):
    _, public, message, signature = _decoded(vector)
    assert keys.verify(public, message, signature) is None


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_verify_rejects_every_flipped_bit_of_the_signature(vector):
    _, public, message, signature = _decoded(vector)
    for bit in range(len(signature) * 8):
        with pytest.raises(BadSignature):
            keys.verify(public, message, _flip(signature, bit))


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_verify_rejects_every_flipped_bit_of_the_public_key(vector):
    _, public, message, signature = _decoded(vector)
    for bit in range(len(public) * 8):
        with pytest.raises(BadSignature):
            keys.verify(_flip(public, bit), message, signature)


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_verify_rejects_a_flipped_bit_of_the_message(vector):
    _, public, message, signature = _decoded(vector)
    if not message:  # TEST 1 signs the empty message: no bit to flip, so change its length
        for extra in (b"\x00", b"\x01", b"\x80"):
            with pytest.raises(BadSignature):
                keys.verify(public, message + extra, signature)
        return
    # every bit of short messages; for the 1023-byte one the first, last and a spread in between
    nbits = 8 * len(message)
    bits = range(nbits) if len(message) <= 64 else [*range(0, nbits, 61), nbits - 1]
    for bit in bits:
        with pytest.raises(BadSignature):
            keys.verify(public, _flip(message, bit), signature)


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_verify_rejects_a_truncated_or_extended_message(vector):
    _, public, message, signature = _decoded(vector)
    with pytest.raises(BadSignature):
        keys.verify(public, message + b"\x00", signature)
    if message:
        with pytest.raises(BadSignature):
            keys.verify(public, message[:-1], signature)


def test_verify_rejects_a_signature_from_another_vector():
    _, public1, message1, _ = _decoded(VECTORS[0])
    _, _, _, signature2 = _decoded(VECTORS[1])
    with pytest.raises(BadSignature):
        keys.verify(public1, message1, signature2)


@pytest.mark.parametrize(
    ("public_len", "signature_len"), [(31, 64), (33, 64), (0, 64), (32, 63), (32, 65), (32, 0)]
)
def test_verify_rejects_wrong_lengths_with_bad_signature(public_len, signature_len):
    _, public, message, signature = _decoded(VECTORS[1])
    public = (public * 2)[:public_len]
    signature = (signature * 2)[:signature_len]
    with pytest.raises(BadSignature):
        keys.verify(public, message, signature)


def test_verify_rejects_an_all_zero_key_and_signature():
    with pytest.raises(BadSignature):
        keys.verify(bytes(32), b"", bytes(64))


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_from_seed_refuses_a_seed_that_is_not_32_bytes(length):
    with pytest.raises(KeyFileError):
        Identity.from_seed(bytes(length))


def test_bad_signature_is_a_protocol_error_with_a_stable_reason():
    assert issubclass(BadSignature, ProtocolError)
    assert BadSignature.reason == "bad_signature"


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_identity_id_is_derived_from_the_public_key(vector):
    seed, public, _, _ = _decoded(vector)
    identity = Identity.from_seed(seed)
    # a hex prefix (at least 64 bits) of SHA-256 over a domain tag and the key
    assert len(identity.id) >= 16
    assert hashlib.sha256(b"starling-id" + public).hexdigest().startswith(identity.id)
    assert identity.id == keys.identity_id(public)
    assert set(identity.id) <= set("0123456789abcdef")
    # Flower's node id: the first 64 bits, shifted into a signed 64-bit int
    assert 0 <= identity.node_id < 2**63
    assert identity.node_id == int(identity.id[:16], 16) >> 1 == keys.node_id(public)


def test_the_five_vectors_give_five_distinct_ids():
    assert len({Identity.from_seed(_decoded(v)[0]).id for v in VECTORS}) == len(VECTORS)
