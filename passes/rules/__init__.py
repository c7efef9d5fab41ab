"""onnxscript rewrite rules used by onnxq passes."""
