"""bench/device.py in its --quick setting: it runs both runtimes end to end and reports every
figure. Timings are the benchmark's business; only what must hold on any machine is asserted."""

from __future__ import annotations

import json


def test_device_bench_quick(bench_script, tmp_path):
    out = tmp_path / "device.json"
    result = bench_script("device").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for figure in ("cold_start_s", "warm_start_s", "latency_ms", "switch_ms", "reload_ms", "prediction_error"):
        assert set(result[figure]) == {"onnxruntime", "torch"}, figure
    for rt in ("onnxruntime", "torch"):
        assert result["cold_start_s"][rt] > 0 and result["latency_ms"][rt]["original"] > 0
        assert result["prediction_error"][rt]["n"] == result["setting"]["compositions"]
    # the light device install is smaller than one with PyTorch, whatever the machine
    assert 0 < result["install_mib"]["onnxruntime"] < result["install_mib"]["torch"]
