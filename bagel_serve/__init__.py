"""bagel-serve for its users: `bagel_serve.client` calls a running gateway (HTTP or gRPC) without loading
torch or any model code."""
