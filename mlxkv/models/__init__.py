"""Model registry, sources and loaders."""
