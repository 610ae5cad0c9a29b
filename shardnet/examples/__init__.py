"""Small, real Executors bundled for the demo, the manifests and the tests."""
