"""Transport security and node authentication: key material, request signing, rate limits.

Nothing here imports grpc: the gRPC modules call in with bytes and strings.
"""
