"""The coordinator: round driver, node registry, gRPC service and fleet, run state."""
