"""RFC 6962 / 9162 Merkle trees over audit records: roots, inclusion proofs, and the compact
range a writer keeps to know the root after every append without holding the tree.

leaf hash = SHA-256(0x00 ‖ record), node hash = SHA-256(0x01 ‖ left ‖ right); the tree over n
leaves splits at the largest power of two below n (RFC 6962 §2.1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash of the given leaf hashes."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    split = _split(len(leaves))
    return node_hash(root(leaves[:split]), root(leaves[split:]))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of leaf `index` in the tree over `leaves` (RFC 6962 §2.1.1)."""
    if not 0 <= index < len(leaves):
        raise IndexError(index)
    if len(leaves) == 1:
        return []
    split = _split(len(leaves))
    if index < split:
        return [*inclusion_proof(leaves[:split], index), root(leaves[split:])]
    return [*inclusion_proof(leaves[split:], index - split), root(leaves[:split])]


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], want: bytes
) -> bool:
    """Whether `proof` shows leaf hash `leaf` at `index` in the tree of `size` with root `want`
    (RFC 9162 §2.1.3.2)."""
    return root_from_inclusion(leaf, index, size, proof) == want


def root_from_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes | None:
    """The root that `proof` leads to from leaf hash `leaf` at `index` of a tree of `size`, or
    None when the proof does not fit such a tree (RFC 9162 §2.1.3.2)."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return None
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
    return r if sn == 0 else None


def all_proofs(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root and every leaf's inclusion proof, hashing each node once (n - 1 hashes, where
    `inclusion_proof` for every leaf would take n² / 2)."""
    if not leaves:
        return EMPTY_ROOT, []
    paths: list[list[bytes]] = [[] for _ in leaves]
    return _subtree(leaves, paths, 0, len(leaves)), paths


def _subtree(leaves: Sequence[bytes], paths: list[list[bytes]], lo: int, hi: int) -> bytes:
    """The root of leaves[lo:hi], adding each node's sibling to the paths below it. Not a
    closure: a recursive one refers to itself, and the cycle would keep every batch's proofs
    for the garbage collector instead of freeing them at once."""
    if hi - lo == 1:
        return leaves[lo]
    split = lo + _split(hi - lo)
    left, right = _subtree(leaves, paths, lo, split), _subtree(leaves, paths, split, hi)
    for i in range(lo, split):
        paths[i].append(right)
    for i in range(split, hi):
        paths[i].append(left)
    return node_hash(left, right)


class CompactRange:
    """The roots of the perfect subtrees covering the leaves so far: O(log n) state from which
    the root of the whole tree follows after every append."""

    def __init__(self, size: int = 0, peaks: Sequence[bytes] = ()) -> None:
        self.size = size
        self._peaks = list(peaks)  # largest subtree first

    def append(self, leaf: bytes) -> None:
        self._peaks.append(leaf)
        size = self.size
        while size & 1:  # merge equal-sized subtrees, as binary addition carries
            right = self._peaks.pop()
            left = self._peaks.pop()
            self._peaks.append(node_hash(left, right))
            size >>= 1
        self.size += 1

    def root(self) -> bytes:
        if not self._peaks:
            return EMPTY_ROOT
        acc = self._peaks[-1]
        for peak in reversed(self._peaks[:-1]):
            acc = node_hash(peak, acc)
        return acc

    @property
    def peaks(self) -> list[bytes]:
        return list(self._peaks)


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)
