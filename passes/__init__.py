"""onnxq graph passes: one module per pass family."""
