"""The device application, `legodnn-fetch`: verify signed bundles, keep a cache that trusts
nothing, time blocks on this device, solve, run the chosen blocks with torch or ONNX
Runtime, switch them when budgets change, predict and export.

Modules, from the command line down: `cli` (parsing, exit codes), `report` (printing),
`watch` (the --watch loop), `predict`, `export`, `session` (DeviceSession, fetch),
`prepare` (verifying bundles, rollback check, timing), `latency` (the device's sealed
timings), `objects` (verified files from cache or store), `cache` (layout, sealing,
commit), `switcher`, and the runtimes: `runtime` (the interface and the choice),
`runtime_torch`, `runtime_onnx`.

Nothing here imports Ray, MLflow or Optuna, and with `--runtime onnxruntime` nothing imports
torch, torch-pruning or SciPy (tested in a fresh interpreter and a fresh virtual
environment with only the device install). Import the module you need; this package
imports nothing itself.

From Python:

    from infra.device.session import DeviceBudgets, fetch
    result = fetch(["s3://fleet/bundles/resnet8"], DeviceBudgets(latency_ms=2.0, memory_bytes=0.6 * 2**20),
                   public_key="bundle-signing.pub", cache="/var/cache/legodnn", runtime="onnxruntime")
    logits = result.session.predict("resnet8", batch)   # a float32 NumPy batch (N, C, H, W)
"""
