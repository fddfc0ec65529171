"""Adapter images: building them, the registry client, pulling and unpacking safely, publishing."""
