"""Wire contracts, settings and broker plumbing shared by every Router service."""
