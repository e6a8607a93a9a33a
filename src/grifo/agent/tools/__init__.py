"""Site-local tools an agent run may call: vector search, allow-listed HTTP, MCP servers."""
