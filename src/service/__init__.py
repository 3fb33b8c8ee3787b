"""privacy-vault's gRPC service: server, servicers, config and CLI. No crypto, no SQL."""
