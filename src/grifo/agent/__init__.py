"""Agent runs: the whole multi-step loop (model step, tool call, tool result, ...) at one point,
next to the tools and data of its site."""
