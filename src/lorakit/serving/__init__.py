"""The serving tier: the HTTP server over one base model and many adapters."""
