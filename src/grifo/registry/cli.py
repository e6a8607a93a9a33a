"""`grifo join-token`: make a join token for points that register themselves."""

from __future__ import annotations

import argparse
import hashlib

from grifo.registry.tokens import generate_join_token


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser(
        "join-token",
        help="make a join token for `grifo point --register`",
        description="Print a new join token and its SHA-256. Put the SHA-256 in the gateway's "
        "`gateway.registry.tokens` with the scope the token grants (jurisdictions, tiers, "
        "name_pattern); give the token to the point's operator (GRIFO_JOIN_TOKEN).",
    )


def run(args: argparse.Namespace) -> int:
    token = generate_join_token()
    print(f"token:  {token}")
    print(f"sha256: {hashlib.sha256(token.encode()).hexdigest()}")
    return 0
