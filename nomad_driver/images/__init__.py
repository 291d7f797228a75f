"""Images: digests, import, store and distribution. Knows nothing of gRPC or Nomad."""
