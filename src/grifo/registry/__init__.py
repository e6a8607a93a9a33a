"""Points that join and leave: join tokens, `/v1/grifo/points`, and the registry applied to
each gateway process (see README, Points join and leave)."""
