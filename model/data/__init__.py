"""Data: loaders, the session protocol, synthetic populations and caching."""
