"""`legodnn keys`, `legodnn publish` and `legodnn bundles`, through the real CLI dispatcher."""

from __future__ import annotations

import json
import stat

from pipelines.cli import main


def test_keys_init_and_refuse_overwrite(tmp_path, capsys):
    assert main(["keys", "init", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    assert "bundle-signing.pub" in out and "key id" in out
    assert stat.S_IMODE((tmp_path / "keys" / "bundle-signing.key").stat().st_mode) == 0o600
    assert main(["keys", "init", str(tmp_path / "keys")]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_publish_to_s3_and_list(built_models, keypair, bucket, capsys):
    rn, vg = built_models["resnet"], built_models["vgg"]
    root = f"s3://{bucket}/team/bundles"
    common = ["--key", str(keypair.private_key), "--to", root]
    assert main(["publish", "--scalable", str(rn.scalable_dir), "--table", str(rn.table_path),
                 "--model-id", "rn8", *common]) == 0
    assert f"published rn8 v1: {root}/rn8/v1" in capsys.readouterr().out
    assert main(["publish", "--scalable", str(vg.scalable_dir), "--table", str(vg.table_path),
                 "--model-id", "vgg11", "--json", *common]) == 0
    published = json.loads(capsys.readouterr().out)
    assert published["version"] == 1 and published["manifest"]["model_id"] == "vgg11"
    assert main(["publish", "--scalable", str(rn.scalable_dir), "--table", str(rn.table_path),
                 "--model-id", "rn8", *common]) == 0
    capsys.readouterr()
    assert main(["bundles", "list", root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["rn8", "v1"], ["rn8", "v2"], ["vgg11", "v1"]]
    assert "latest" in lines[1] and "latest" not in lines[0]
    assert main(["bundles", "list", f"{root}/rn8", "--json"]) == 0
    refs = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["latest"]) for r in refs] == [(1, False), (2, True)]


def test_publish_bad_input_is_a_clear_error(built_models, keypair, tmp_path, capsys):
    rn = built_models["resnet"]
    rc = main(["publish", "--scalable", str(tmp_path), "--table", str(rn.table_path), "--to", str(tmp_path / "s"),
               "--key", str(keypair.private_key), "--model-id", "rn8"])
    assert rc == 1
    assert "scalable.json not found" in capsys.readouterr().err
