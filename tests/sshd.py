"""A real sshd on 127.0.0.1 for the SSH paths (filled in by the queen/keeper work)."""
