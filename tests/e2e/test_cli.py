"""The ``tta`` command line against a live server: what a user types, what they read back."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.images import png_bytes
from tests.support.servers import free_port

COLOURS = "red,green,blue"


def tta(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TTA_SERVER"} | {"COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "ttaserve_client", *map(str, args)], capture_output=True, text=True, env=env, check=False
    )
    if check:
        assert done.returncode == 0, f"tta {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def folder_of_images(root: Path, count: int) -> list[Path]:
    """``count`` PNGs spread over nested folders, with a file that is not an image beside them."""
    paths = []
    for i in range(count):
        path = root / f"batch{i % 3}" / ("deep" if i % 2 else "") / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(seed=i, size=(16, 16)))
        paths.append(path)
    (root / "notes.txt").write_text("not an image")
    return sorted(paths)


def test_classify_a_folder_as_json_lines_csv_and_a_table(served, tmp_path):
    url, _ = served
    images = folder_of_images(tmp_path / "photos", 11)
    done = tta("--server", url, "classify", tmp_path / "photos", "--labels", COLOURS, "--format", "jsonl",
               "--batch", "4", "--concurrency", "2")  # fmt: skip
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(Path(r["path"]) for r in rows) == images  # recursive, images only, each once
    assert all(r["label"] in COLOURS.split(",") and 0 < r["confidence"] <= 1 for r in rows)
    assert all(r["result"]["predictions"][0]["label"] == r["label"] for r in rows)
    assert "11 images in" in done.stderr and "images/s" in done.stderr and "classify" in done.stderr  # the bar

    out = tmp_path / "out.csv"
    tta("--server", url, "classify", images[0], images[1], "--labels", COLOURS, "--format", "csv", "-o", out)
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [Path(r["path"]) for r in table] == images[:2] and table[0]["method"] == "zero_shot"

    done = tta("--server", url, "classify", images[0], "--labels", COLOURS, "--method", "tps",
               "--options", '{"views": 4}')  # fmt: skip
    assert str(images[0]) in done.stdout and "tps" in done.stdout  # the table, paths whole


def test_classify_tells_what_is_wrong(served, tmp_path):
    url, _ = served
    (image,) = folder_of_images(tmp_path / "one", 1)
    assert "give --labels" in tta("--server", url, "classify", image, check=False).stderr
    refused = tta("--server", url, "classify", image, "--label-set", "nope", check=False)
    assert refused.returncode == 1 and "404 unknown_label_set" in refused.stderr and "Traceback" not in refused.stderr
    bad = tta("--server", url, "classify", image, "--labels", COLOURS, "--options", "[1]", check=False)
    assert bad.returncode == 2 and "JSON object" in bad.stderr
    gone = tta("--server", f"http://127.0.0.1:{free_port()}", "--retries", "0", "methods", check=False)
    assert gone.returncode == 1 and "ConnectError" in gone.stderr and "Traceback" not in gone.stderr


def test_label_sets_and_calibration_from_a_folder(served, tmp_path):
    url, _ = served
    created = json.loads(tta("--server", url, "label-sets", "create", "colours", "--labels", COLOURS).stdout)
    assert created["labels"] == ["red", "green", "blue"]
    assert "│ colours " in tta("--server", url, "label-sets", "list").stdout
    assert json.loads(tta("--server", url, "label-sets", "show", "colours").stdout)["name"] == "colours"

    labelled = tmp_path / "labelled"
    for k, colour in enumerate(["red", "green", "blue"]):
        (labelled / colour).mkdir(parents=True)
        for i in range(8):
            (labelled / colour / f"{i}.png").write_bytes(png_bytes(seed=10 * k + i, size=(16, 16)))
    done = tta("--server", url, "calibrate", "colours", labelled)
    assert "24 images of 3 labels" in done.stderr
    assert "zero_shot" in done.stdout and "24" in done.stdout  # the fitted calibration, on 24 images

    (labelled / "purple").mkdir()
    (labelled / "purple" / "x.png").write_bytes(png_bytes(size=(16, 16)))
    refused = tta("--server", url, "calibrate", "colours", labelled, check=False)
    assert refused.returncode == 1 and "unknown_label" in refused.stderr and "purple" in refused.stderr

    tta("--server", url, "label-sets", "delete", "colours")
    assert "│ colours " not in tta("--server", url, "label-sets", "list").stdout


def test_bench_prints_latency_percentiles_and_throughput(served):
    url, _ = served
    done = tta("--server", url, "bench", "--requests", "6", "--concurrency", "2", "--size", "32")
    for column in ("p50 ms", "p99 ms", "requests/s", "images/s"):
        assert column in done.stdout
    assert "│ 6 " in done.stdout or "| 6 " in done.stdout  # six requests answered


def test_serve_hands_over_to_the_server():
    done = tta("serve", "--help")
    assert "--model" in done.stdout and "TTA_MODEL" in done.stdout


def test_adapters_upload_list_serve_download_and_delete(served, tmp_path):
    import httpx
    import torch
    import torch.nn.functional as F

    from adapters.fewshot.artifact import Adapter, AdapterCard

    url, _ = served
    model = httpx.get(f"{url}/v1/models").json()["models"][0]
    dim, labels = model["embed_dim"], COLOURS.split(",")
    tensors = {
        "label_features": F.normalize(torch.eye(dim)[:3] + 0.1, dim=-1),
        "prototypes": F.normalize(torch.eye(dim)[:3] + 0.1, dim=-1),
        "text.weight": torch.eye(dim) + 0.2 * torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)),
        "text.bias": torch.zeros(dim),
    }
    card = AdapterCard(type="apex", parts=("text_adapter",), base_model=model["fingerprint"], labels=tuple(labels))
    artifact = tmp_path / "colours.safetensors"
    artifact.write_bytes(Adapter(card, tensors).to_bytes())

    stored = json.loads(tta("--server", url, "adapters", "upload", artifact, "--name", "colours").stdout)
    assert stored["ref"] == "colours@v1"
    assert "colours@v1" in tta("--server", url, "adapters", "list").stdout
    image = tmp_path / "one.png"
    image.write_bytes(png_bytes(seed=1, size=(16, 16)))
    done = tta("--server", url, "classify", image, "--labels", COLOURS, "--adapter", "colours", "--format", "jsonl")
    assert json.loads(done.stdout)["result"]["adapter"]["adapter"] == "colours@v1"
    refused = tta("--server", url, "classify", image, "--labels", COLOURS, "--adapter", "colours",
                  "--adapter-alpha", "most", check=False)  # fmt: skip
    assert refused.returncode != 0 and "--adapter-alpha" in refused.stderr
    copy = tmp_path / "copy.safetensors"
    tta("--server", url, "adapters", "download", "colours@v1", "-o", copy)
    assert copy.read_bytes() == artifact.read_bytes()
    tta("--server", url, "adapters", "delete", "colours")
    gone = tta("--server", url, "adapters", "show", "colours", check=False)
    assert gone.returncode != 0 and "unknown_adapter" in gone.stderr
