"""Image signatures: keys held in Vault's transit engine, DSSE envelopes beside the images,
verification before every start. Knows nothing of gRPC or Nomad."""
