"""infra: bundles, stores, signing and the device-side fetch script.

Deliberately empty: `infra.fetch` runs on devices that have only torch, numpy, boto3 and
cryptography, so importing the package must not pull in MLflow (`infra.tracking`) or Ray.
"""
