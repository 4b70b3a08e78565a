"""What the client tests share besides fixtures."""

TOKEN = "client-test-token"
