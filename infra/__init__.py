"""infra: bundles, stores, signing, and the device application (`infra.device`).

Deliberately empty: the device runs with the light install (numpy, onnxruntime, onnx,
boto3, cryptography, Pillow, msgspec), so importing the package must not pull in MLflow
(`infra.tracking`), Ray or torch.
"""
