"""The audit log: a hash-chained, Merkle-checkpointed, signed record of where each request ran."""
