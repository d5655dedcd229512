"""Screenshots of the MLflow UI for docs/MLFLOW.md, taken with headless Chromium.

    .venv/bin/python docs/tools/screenshots.py --uri http://127.0.0.1:5000 --experiment legodnn --out docs/figures

The tracking server must be running (the UI is the server). One headless Chromium (Debian:
apt-get install chromium) is driven over the DevTools protocol on 127.0.0.1 (aiohttp, which
Ray installs): the UI is put in its "Model training" mode with the assistant panel closed
(its local-storage settings), then each page is loaded, given `--wait` seconds to fetch and
draw its data, and captured. Pages: the runs of the experiment, the parent run (overview,
model metrics, system metrics, the Pareto plot artifact), the variants of one block filtered
by tag, the logged models and the registered model.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

SETTINGS = {  # the UI's local-storage keys (MLflow 3.17): "<key>_v<version>" -> a JSON value
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.panelOpen_v1": False,
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
}


COLUMNS = ["metrics.`accuracy_drop`", "metrics.`latency_ms`", "metrics.`latency_p90_ms`", "metrics.`flops`",
           "metrics.`retrain_loss_after`", "tags.`legodnn.sparsity`", "attributes.`Models`"]


def expand_runs(experiment_id: str, parent_id: str) -> str:
    """JavaScript that shows the parent run's children and the variants' metric columns in the
    runs table (the experiment page's saved view state)."""
    key = f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState'
    return (f"const k = {json.dumps(key)}; const v = JSON.parse(localStorage.getItem(k) || '{{}}');"
            f"v.runsExpanded = {{[{json.dumps(parent_id)}]: true}}; v.selectedColumns = {json.dumps(COLUMNS)};"
            "localStorage.setItem(k, JSON.stringify(v));")


def pages(uri: str, experiment: str, model: str, block: str, run_id: str | None = None) -> tuple[str, dict[str, str]]:
    """The JavaScript that prepares the runs table, and name -> URL of every page to capture."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = [client.get_run(run_id)] if run_id else client.search_runs(
        [exp], "tags.`legodnn.kind` = 'pipeline'", order_by=["start_time DESC"], max_results=1)
    run = f"{uri}/#/experiments/{exp}/runs/{parent.info.run_id}"
    ml = "workflowType=machine_learning"
    return expand_runs(exp, parent.info.run_id), {
        "mlflow-runs": f"{uri}/#/experiments/{exp}/runs?{ml}",
        "mlflow-run": f"{run}?{ml}",
        "mlflow-run-metrics": f"{run}/model-metrics?{ml}",
        "mlflow-system-metrics": f"{run}/system-metrics?{ml}",
        "mlflow-pareto": f"{run}/artifacts/pareto.png?{ml}",
        "mlflow-block-variants": f"{uri}/#/experiments/{exp}/runs?{ml}&searchFilter="
                                 + quote(f"tags.`legodnn.block` = '{block}'"),
        "mlflow-logged-models": f"{uri}/#/experiments/{exp}/models?{ml}",
        "mlflow-registered-model": f"{uri}/#/models/{model}?{ml}",
    }


async def capture(browser: str, prepare: str, shots: dict[str, str], out: Path, size: tuple[int, int],
                  wait_s: float) -> None:
    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                 "--disable-background-networking", "--disable-dev-shm-usage",
                                 f"--window-size={size[0]},{size[1]}", f"--remote-debugging-port={port}",
                                 f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(100):
                    try:
                        targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
                        break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.2)
                page = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                async with http.ws_connect(page, max_msg_size=0) as ws:
                    ids = iter(range(1, 10**6))

                    async def call(method: str, **params: Any) -> dict[str, Any]:
                        n = next(ids)
                        await ws.send_json({"id": n, "method": method, "params": params})
                        async for msg in ws:
                            data = json.loads(msg.data)
                            if data.get("id") == n:
                                return data.get("result", {})
                        raise RuntimeError("Chromium closed the DevTools connection")

                    # Settings are written on a page that does not hold them (the app saves its own on leaving).
                    await call("Page.navigate", url=next(iter(shots.values())).split("#")[0] + "#/experiments")
                    await asyncio.sleep(wait_s)
                    for key, value in SETTINGS.items():
                        await call("Runtime.evaluate", expression=f"localStorage.setItem({key!r}, {json.dumps(value)!r})")
                    await call("Runtime.evaluate", expression=prepare)
                    for name, url in shots.items():
                        await call("Page.navigate", url="about:blank")  # a full load, not a hash change
                        await call("Page.navigate", url=url)
                        await asyncio.sleep(wait_s)
                        shot = await call("Page.captureScreenshot", format="png")
                        (out / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
                        print(f"{out / name}.png  <-  {url}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uri", required=True, help="the MLflow tracking server, e.g. http://127.0.0.1:5000")
    p.add_argument("--experiment", default="legodnn")
    p.add_argument("--model", default="resnet20", help="the registered model (the bundle's model id)")
    p.add_argument("--run", help="the pipeline run to show (default: the newest)")
    p.add_argument("--block", default="layer2.1", help="the block whose variants the filtered view shows")
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    p.add_argument("--size", default="1500,950", help="window width,height")
    p.add_argument("--wait", type=float, default=10.0, help="seconds each page gets to load its data")
    args = p.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.size.split(","))
    prepare, shots = pages(args.uri, args.experiment, args.model, args.block, args.run)
    asyncio.run(capture(browser, prepare, shots, args.out, (width, height), args.wait))


if __name__ == "__main__":
    main()
