"""RFC 9162 Merkle hashing and proofs against a direct recursive definition."""

from __future__ import annotations

import hashlib

import pytest

from appliance.audit import merkle


def mth(leaves: list[bytes]) -> bytes:
    """The RFC's recursive definition, verbatim."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


LEAVES = [f"event-{i}".encode() for i in range(40)]
HASHES = [merkle.leaf_hash(d) for d in LEAVES]


def test_known_vector_empty_and_single():
    assert merkle.root_from_leaf_hashes([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert merkle.root_from_leaf_hashes([merkle.leaf_hash(b"")]).hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")


@pytest.mark.parametrize("n", list(range(1, 41)))
def test_root_matches_the_recursive_definition(n):
    assert merkle.root_from_leaf_hashes(HASHES[:n]) == mth(LEAVES[:n])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13, 16, 31, 40])
def test_inclusion_proofs_verify_and_reject_wrong_leaves(n):
    root = mth(LEAVES[:n])
    for i in range(n):
        proof = merkle.inclusion_proof(HASHES[:n], i)
        assert merkle.verify_inclusion(HASHES[i], i, n, proof, root)
        assert not merkle.verify_inclusion(merkle.leaf_hash(b"forged"), i, n, proof, root)
        if n > 1:
            assert not merkle.verify_inclusion(HASHES[i], (i + 1) % n, n, proof, root)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 17, 32, 40])
def test_consistency_proofs_between_every_prefix(n):
    new_root = mth(LEAVES[:n])
    for m in range(1, n + 1):
        proof = merkle.consistency_proof(HASHES[:n], m)
        assert merkle.verify_consistency(m, n, mth(LEAVES[:m]), new_root, proof), (m, n)
        if m < n:
            rewritten = [*LEAVES[:m - 1], b"rewritten", *LEAVES[m:n]]
            assert not merkle.verify_consistency(m, n, mth(LEAVES[:m]), mth(rewritten), proof)
