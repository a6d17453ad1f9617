"""What serves deployment: the format registry (`formats`: ONNX, ExecuTorch, Core ML, ncnn), the deploy table's
runtimes (`runtimes`), cross-layer equalization for INT8 (`quant`), MAC / parameter counts, fusion error and the
round-robin timer (`profile`), and the zoo report's comparison models (`peers`)."""
