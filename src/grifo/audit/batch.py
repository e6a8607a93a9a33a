"""Attestations signed in batches: one Ed25519 signature for every answer of an event-loop
turn.

An Ed25519 signature costs tens of microseconds, more than the rest of a request's audit
work. Answers that complete in the same turn of the event loop ask for their attestations
together; the batch's claims are the leaves of a Merkle tree (RFC 6962 hashing, `merkle.py`)
and one signature covers its root. A lone answer (always, at low load) gets the plain token
`<claims>.<signature>`; an answer of a batch of n > 1 gets
`<claims>.<signature>.<proof>`, where the signature is over the batch statement

    grifo-attestation-batch/v1\\n<n>\\n<base64 root>\\n

and `<proof>` is base64url(index as 4 bytes ‖ n as 4 bytes ‖ the audit path's hashes). A
verifier hashes the claims as a leaf, climbs the path to the root, rebuilds the statement and
checks the signature (`signing.verify_attestation`): each answer still proves its own claims
and nothing about its neighbours but that they were signed at once. The statement starts with
text no claims JSON can start with, so a batch signature is never mistaken for a claim's.
"""

from __future__ import annotations

import asyncio
import struct

import msgspec

from grifo.audit import merkle
from grifo.audit.signing import Claims, Signer, b64url, batch_statement

MAX_BATCH = 1024  # bounds the proofs: at most 10 hashes


def encode_proof(index: int, size: int, path: list[bytes]) -> bytes:
    return struct.pack(">II", index, size) + b"".join(path)


class BatchAttester:
    """`await attest(claims)`: the token, signed with the other claims of this loop turn."""

    def __init__(self, signer: Signer) -> None:
        self._signer = signer
        self._waiting: list[tuple[bytes, asyncio.Future[str]]] = []
        self.batches = 0
        self.signed = 0

    async def attest(self, claims: Claims) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if not self._waiting:
            future.get_loop().call_soon(self._sign)
        self._waiting.append((msgspec.json.encode(claims), future))
        return await future

    def attest_alone(self, claims: Claims) -> str:
        """The token of a request with no other in progress: signed now, without waiting for
        the next loop turn (there is nothing to share a signature with)."""
        payload = msgspec.json.encode(claims)
        self.batches += 1
        self.signed += 1
        return self._tokens([payload])[0]

    def _sign(self) -> None:
        """Runs one loop turn after the first request: signs what gathered by then."""
        waiting, self._waiting = self._waiting, []
        while waiting:
            batch, waiting = waiting[:MAX_BATCH], waiting[MAX_BATCH:]
            self.batches += 1
            self.signed += len(batch)
            try:
                tokens = self._tokens([payload for payload, _ in batch])
            except Exception as exc:  # the key failed: every request of the batch fails
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), token in zip(batch, tokens, strict=True):
                if not future.done():  # a request cancelled meanwhile needs no token
                    future.set_result(token)

    def _tokens(self, payloads: list[bytes]) -> list[str]:
        if len(payloads) == 1:
            alone = self._signer.sign(payloads[0])
            return [f"{b64url(payloads[0])}.{b64url(alone)}"]
        size = len(payloads)
        root, paths = merkle.all_proofs([merkle.leaf_hash(p) for p in payloads])
        signed = b64url(self._signer.sign(batch_statement(size, root)))
        return [
            f"{b64url(payload)}.{signed}.{b64url(encode_proof(index, size, path))}"
            for index, (payload, path) in enumerate(zip(payloads, paths, strict=True))
        ]
