"""RFC 9162 Merkle trees: root hashes, inclusion and consistency proofs.

Hashing (RFC 9162 section 2.1.1)::

    MTH({})      = SHA-256()
    MTH({d(0)})  = SHA-256(0x00 || d(0))
    MTH(D[n])    = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   k = largest power of two < n

Proof generation follows section 2.1.3 / 2.1.4 and verification the
algorithms of sections 2.1.3.2 and 2.1.4.2, so proofs interoperate with
Certificate Transparency tooling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (n >= 2)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over leaves given as their leaf hashes; iterative, O(n) time, O(log n) memory."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    # A stack of (size, hash) of perfect subtrees, merged like binary addition;
    # the leftover right-hand subtrees are then folded from right to left.
    stack: list[tuple[int, bytes]] = []
    for h in hashes:
        size, node = 1, h
        while stack and stack[-1][0] == size:
            left_size, left = stack.pop()
            size, node = left_size + size, node_hash(left, node)
        stack.append((size, node))
    node = stack.pop()[1]
    while stack:
        node = node_hash(stack.pop()[1], node)
    return node


def _subtree(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    return root_from_leaf_hashes(hashes[lo:hi])


def inclusion_proof(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]) for leaf ``index`` in the tree of all ``hashes``."""
    n = len(hashes)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} is outside a tree of size {n}")

    def path(m: int, lo: int, hi: int) -> list[bytes]:
        size = hi - lo
        if size == 1:
            return []
        k = _split(size)
        if m < k:
            return [*path(m, lo, lo + k), _subtree(hashes, lo + k, hi)]
        return [*path(m - k, lo + k, hi), _subtree(hashes, lo, lo + k)]

    return path(index, 0, n)


def consistency_proof(hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(m, D[n]): that the tree of the first ``old_size`` leaves is a prefix of the whole."""
    n = len(hashes)
    if not 0 < old_size <= n:
        raise ValueError(f"old tree size {old_size} must be in 1..{n}")

    def subproof(m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        size = hi - lo
        if m == size:
            return [] if complete else [_subtree(hashes, lo, hi)]
        k = _split(size)
        if m <= k:
            return [*subproof(m, lo, lo + k, complete), _subtree(hashes, lo + k, hi)]
        return [*subproof(m - k, lo + k, hi, False), _subtree(hashes, lo, lo + k)]

    return subproof(old_size, 0, n, True)


def verify_inclusion(leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2, with ``leaf`` the leaf hash."""
    if index >= tree_size:
        return False
    fn, sn, r = index, tree_size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2."""
    if old_size == new_size:
        return not proof and old_root == new_root
    if not 0 < old_size < new_size or not proof:
        return False
    proof = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        proof.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0
