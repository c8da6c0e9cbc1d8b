"""Wire protocol: generated protobuf/gRPC modules (``fedloom.protos.fedloom.protos``) and ``serde``.

``serde`` is the only place where proto types meet fedloom's domain types.
"""
