"""Stage 6: send to the best candidate; before the first byte, fail over inside the allowed set."""
