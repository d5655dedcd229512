"""Screenshots of the MLflow UI for docs/MLFLOW.md, taken with headless Chromium.

    python docs/tools/screenshots.py --uri http://127.0.0.1:5000 --experiment legodnn --out docs/figures

The tracking server must be running (the UI is the server). Each page is loaded in a fresh
headless Chromium (Debian: apt-get install chromium) with a virtual-time budget, so the
single-page app has fetched and drawn its data before the PNG is taken. Pages: the runs of the
experiment, the parent run (overview, model metrics, system metrics, artifacts), the variants
of one block filtered by tag, the logged models and the registered model.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote


def shoot(browser: str, url: str, path: Path, size: str, wait_ms: int) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--hide-scrollbars", "--disable-dev-shm-usage", f"--window-size={size}",
                    f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"{path}  <-  {url}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uri", required=True, help="the MLflow tracking server, e.g. http://127.0.0.1:5000")
    p.add_argument("--experiment", default="legodnn")
    p.add_argument("--model", default="resnet20", help="the registered model (the bundle's model id)")
    p.add_argument("--block", default="layer2.1", help="the block whose variants the filtered view shows")
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    p.add_argument("--size", default="1500,950")
    p.add_argument("--wait-ms", type=int, default=15000, help="virtual time the page gets to load its data")
    args = p.parse_args()
    from mlflow import MlflowClient

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: apt-get install chromium")
    client = MlflowClient(args.uri)
    exp = client.get_experiment_by_name(args.experiment).experiment_id
    (parent,) = client.search_runs([exp], "tags.`legodnn.kind` = 'pipeline'", order_by=["start_time DESC"],
                                   max_results=1)
    run = f"{args.uri}/#/experiments/{exp}/runs/{parent.info.run_id}"
    block = quote(f"tags.`legodnn.block` = '{args.block}'")
    pages = {
        "mlflow-runs": f"{args.uri}/#/experiments/{exp}/runs",
        "mlflow-run": run,
        "mlflow-run-metrics": f"{run}/model-metrics",
        "mlflow-system-metrics": f"{run}/system-metrics",
        "mlflow-pareto": f"{run}/artifacts/pareto.png",
        "mlflow-block-variants": f"{args.uri}/#/experiments/{exp}/runs?searchFilter={block}",
        "mlflow-logged-models": f"{args.uri}/#/experiments/{exp}/models",
        "mlflow-registered-model": f"{args.uri}/#/models/{args.model}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, url in pages.items():
        shoot(browser, url, args.out / f"{name}.png", args.size, args.wait_ms)


if __name__ == "__main__":
    main()
