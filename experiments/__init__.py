"""Command-line launchers (absl flags): thin wrappers that call the library and report."""
