"""HTTP/1.1 on asyncio protocols and the httptools (llhttp) parser: server edge and pooled client.

Only this package touches sockets for HTTP; everything above it sees `Request` and `Response`.
"""
