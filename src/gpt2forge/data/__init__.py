"""Data: document sources, token shards, parallel preparation, and the exact-resume loader."""
