"""End-to-end tests: the real mailerd program driven by real SMTP clients."""
