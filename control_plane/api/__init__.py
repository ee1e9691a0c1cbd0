"""The operator-facing gRPC services: one module per service, errors mapped in `errors`."""
