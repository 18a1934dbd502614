"""Does a user switching from open_clip lose anything? The same model and hyper-parameters trained by
open_clip_train (a csv of image files) and by this project (the MDS streams they were written from),
for the same steps, per seed, then both scored by CLIP_benchmark's own CLI on the same test sets.

    python bench/quality_parity.py                       # after `make shards`; 3 seeds of 512 steps
    python bench/quality_parity.py --seeds 0 1 2 3 4 --epochs 8
    python bench/quality_parity.py --folder runs/qp_variant --ours data.augment.jpeg_draft=false
        # a variant of this side; link the folder's peer/ and scores/peer-seed<N> to reuse the peer's runs

Both sides see the same data: every row of the sample's training streams (data/sample/web and coco),
the same image bytes, the first caption of each image (this project: `data.captions={caption: 1.0}`;
the csv has one caption per image), each stream in its natural share (`proportion: null`: the csv
holds every row once), an epoch being every row once; `--epochs` epochs of floor(rows / 128) steps
(open_clip_train drops the last partial batch). Model: the demo recipe's (yamls/demo_cpu.yaml), AdamW
1e-3, weight decay 0.1, betas (0.9, 0.98), eps 1e-6, 40 warm-up steps then cosine to 0, fp32, one
loader worker each. Differences left: open_clip_train decays every 2-D parameter (token and position
embeddings included), this project not the embeddings; its loader shuffles the whole csv every epoch,
this project's streaming shuffles in blocks.

Scores: CLIP_benchmark (`clip_benchmark eval`) on all 10,000 Fashion-MNIST test images
(data/eval/fashion_mnist_test, `make ablate` builds it) and the 365 held-out emoji, both written in its
webdataset layout by its own builder; each model is opened as `local-dir:` from open_clip's hub layout.
Prints per-seed scores, the paired difference (this project - open_clip_train) with its 95% interval
(Student's t over seeds), and each side's wall-clock: the whole command, and the training loop alone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.common.intervals import percent_interval  # noqa: E402
from pipeline.common.tables import markdown_table  # noqa: E402

TRAIN_STREAMS = ("data/sample/web", "data/sample/coco")
FASHION_TEST, EMOJI_TEST = "data/eval/fashion_mnist_test", "data/sample/eval/web_test"
BATCH, WARMUP = 128, 40
MODEL_NAME = "tiny-vit-demo"
# CLIP_benchmark's scores: (dataset, its key) -> the name shown
SCORES = {
    ("fashion_mnist", "acc1"): "fashion_mnist top-1",
    ("emoji", "image_retrieval_recall@5"): "emoji text->image R@5",
    ("emoji", "text_retrieval_recall@5"): "emoji image->text R@5",
}


def run(command: list, log: str) -> float:
    """Run to completion with its output in `log`; the seconds it took."""
    started = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{' '.join(command[:3])} ... failed (exit {code}); see {log}")
    return time.perf_counter() - started


def image_suffix(data: bytes) -> str:
    from PIL import Image

    return {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[Image.open(io.BytesIO(data)).format]


def write_files(stream: str, folder: str) -> list:
    """Every sample of an MDS stream as (image file, sample), the file holding the stored bytes."""
    from streaming import StreamingDataset

    os.makedirs(folder, exist_ok=True)
    dataset = StreamingDataset(local=os.path.join(REPO, stream), batch_size=1, shuffle=False)
    written = []
    for i in range(dataset.num_samples):
        sample = dataset[i]
        path = os.path.join(folder, f"{i:06d}{image_suffix(sample['image'])}")
        with open(path, "wb") as f:
            f.write(sample["image"])
        written.append((path, sample))
    return written


def training_csv(folder: str) -> tuple:
    """open_clip_train's csv of the training streams' rows (first caption); (path, rows)."""
    path = os.path.join(folder, "train.csv")
    if not os.path.isfile(path):  # written last: the files are there
        rows = [row for stream in TRAIN_STREAMS for row in write_files(stream, f"{folder}/{os.path.basename(stream)}")]
        with open(path + ".tmp", "w") as f:
            f.write("filepath\ttitle\n")
            f.writelines(f"{file}\t{sample['caption']}\n" for file, sample in rows)
        os.replace(path + ".tmp", path)
    with open(path) as f:
        return path, sum(1 for _ in f) - 1


class Labelled(list):
    """(image file, label) pairs with what CLIP_benchmark's builder reads for a classification set."""

    classes: tuple = ()
    templates: tuple = ()


def test_sets(folder: str) -> str:
    """The test sets in CLIP_benchmark's webdataset layout, written by its builder: <root>/wds_<name>."""
    from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset, path_to_bytes

    root = os.path.join(folder, "test_sets")
    if os.path.isfile(os.path.join(root, "done")):
        return root
    fashion = Labelled((path, int(s["label"])) for path, s in write_files(FASHION_TEST, f"{root}/files/fashion"))
    with open(os.path.join(REPO, FASHION_TEST, "classnames.txt")) as f:
        fashion.classes = f.read().split("\n")[:-1]
    with open(os.path.join(REPO, FASHION_TEST, "zeroshot_classification_templates.txt")) as f:
        fashion.templates = [t.replace("{}", "{c}") for t in f.read().split("\n")[:-1]]
    emoji = [(path, [s["caption"]]) for path, s in write_files(EMOJI_TEST, f"{root}/files/emoji")]
    convert_dataset(fashion, "test", f"{root}/wds_fashion_mnist", transform=path_to_bytes, verbose=False)
    convert_retrieval_dataset(emoji, "test", f"{root}/wds_emoji", transform=path_to_bytes, verbose=False)
    open(os.path.join(root, "done"), "w").close()
    return root


def demo_model() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "yamls", "demo_cpu.yaml")).model.custom)


def train_ours(folder: str, seed: int, steps: int, variant: list) -> tuple:
    """This project's run (`variant`: more key=value overrides) and its export; (command seconds,
    training-loop seconds)."""
    run_dir = os.path.join(folder, f"ours-seed{seed}")
    overrides = [
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"max_duration={steps}ba",
        f"scheduler.warmup={WARMUP}ba",
        f"checkpoint.save_interval={steps}ba",
        "data.captions={caption: 1.0}",
        "data.streams.web.proportion=null",
        "data.streams.coco.proportion=null",
        "progress_bar=false",
        *variant,
    ]
    seconds = 0.0
    if not os.path.isfile(os.path.join(run_dir, "export", "open_clip_config.json")):
        seconds = run([sys.executable, "pipeline/train.py", "yamls/demo_cpu.yaml", *overrides], f"{run_dir}.log")
        export = ["pipeline/export.py", "yamls/eval/zeroshot.yaml", f"{run_dir}/export", f"load_path={run_dir}"]
        run([sys.executable, *export], f"{run_dir}-export.log")
    with open(os.path.join(run_dir, "summary.json")) as f:
        return seconds, json.load(f)["wall_seconds"]


PEER_RUNNER = """
import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


def train_peer(folder: str, seed: int, epochs: int, csv_path: str) -> tuple:
    """open_clip_train's run and its export; (command seconds, training-loop seconds from its log)."""
    logs, name = os.path.join(folder, "peer"), f"seed{seed}"
    export_dir = os.path.join(logs, name, "export")
    config = os.path.join(folder, f"{MODEL_NAME}.json")
    with open(config, "w") as f:
        json.dump(demo_model(), f)
    options = (
        f"--train-data {csv_path} --dataset-type csv --model {MODEL_NAME} "
        f"--batch-size {BATCH} --epochs {epochs} --lr 1e-3 --wd 0.1 --beta1 0.9 --beta2 0.98 --eps 1e-6 "
        f"--warmup {WARMUP} --lr-scheduler cosine --precision fp32 --workers 1 --seed {seed} "
        f"--save-frequency {epochs} --log-every-n-steps 1 --logs {logs} --name {name}"
    ).split(" ")
    seconds = 0.0
    if not os.path.isfile(os.path.join(export_dir, "open_clip_config.json")):
        os.makedirs(logs, exist_ok=True)
        seconds = run([sys.executable, "-c", PEER_RUNNER, config, *options], os.path.join(logs, f"{name}.log"))
        export_peer(config, os.path.join(logs, name, "checkpoints", f"epoch_{epochs}.pt"), export_dir)
    with open(os.path.join(logs, name, "out.log")) as f:
        steps = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", f.read())]
    return seconds, sum(steps)


def export_peer(config: str, checkpoint: str, out: str) -> None:
    """open_clip_train's checkpoint in open_clip's hub layout, through this project's writer."""
    import open_clip
    import torch

    from pipeline.config.schema import ModelConfig
    from pipeline.model.export import export_folder

    open_clip.add_model_config(config)
    clip = open_clip.create_model(MODEL_NAME)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]  # our own run's file
    clip.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    export_folder(clip, ModelConfig(name=MODEL_NAME, custom=demo_model()), out)


def score(model_dir: str, sets: str, out: str) -> dict:
    """CLIP_benchmark's CLI on each set; {(dataset, key): value}."""
    results = {}
    for name, task in (("fashion_mnist", "zeroshot_classification"), ("emoji", "zeroshot_retrieval")):
        if not os.path.isfile(f"{out}/{name}.json"):
            command = [
                os.path.join(os.path.dirname(sys.executable), "clip_benchmark"),
                "eval",
                *("--model", f"local-dir:{model_dir}", "--pretrained", "local", "--task", task),
                *("--dataset", f"wds/{name}", "--dataset_root", f"{sets}/wds_{{dataset}}"),
                *("--recall_k", "1", "5", "10", "--batch_size", "250", "--num_workers", "1", "--no_amp"),
                *("--output", f"{out}/{{dataset}}.json"),
            ]
            os.makedirs(out, exist_ok=True)
            run(command, f"{out}/clip_benchmark-{name}.log")
        with open(f"{out}/{name}.json") as f:
            results.update({(name, k): v for k, v in json.load(f)["metrics"].items()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="runs/quality_parity")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--ours",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="a variant of this project's side (data.augment.jpeg_draft=false), in a --folder of its own",
    )
    args = parser.parse_args()
    folder = os.path.join(REPO, args.folder)
    csv_path, rows = training_csv(os.path.join(folder, "train_files"))
    steps = args.epochs * (rows // BATCH)
    sets = test_sets(folder)
    per_seed = []
    for seed in args.seeds:
        ours_seconds, ours_loop = train_ours(folder, seed, steps, args.ours)
        peer_seconds, peer_loop = train_peer(folder, seed, args.epochs, csv_path)
        ours = score(f"{folder}/ours-seed{seed}/export", sets, f"{folder}/scores/ours-seed{seed}")
        peer = score(f"{folder}/peer/seed{seed}/export", sets, f"{folder}/scores/peer-seed{seed}")
        per_seed.append((seed, ours, peer, (ours_seconds, ours_loop), (peer_seconds, peer_loop)))
        print(json.dumps({"seed": seed, "ours": ours_loop, "peer": peer_loop}), file=sys.stderr, flush=True)

    table = [["seed", *(f"{n} ({side})" for n in SCORES.values() for side in ("ours", "open_clip_train"))]]
    table[0] += ["training loop s (ours / open_clip_train)", "command s (ours / open_clip_train)"]
    for seed, ours, peer, ours_time, peer_time in per_seed:
        cells = [f"{100 * side[key]:.2f}" for key in SCORES for side in (ours, peer)]
        times = [f"{ours_time[i]:.0f} / {peer_time[i]:.0f}" if ours_time[i] else "(earlier run)" for i in (1, 0)]
        table.append([str(seed), *cells, *times])
    differences = [["", *SCORES.values(), "training loop speed (open_clip_train s / ours s)"]]
    differences.append(
        [
            "this project - open_clip_train, points [95% interval]",
            *(percent_interval([o[key] - p[key] for _, o, p, _, _ in per_seed], signed=True) for key in SCORES),
            ", ".join(f"{p[1] / o[1]:.2f}x" for _, _, _, o, p in per_seed),
        ]
    )
    print(
        f"\n{rows} training images, {args.epochs} epochs = {steps} steps of {BATCH}, seeds {args.seeds}; "
        "CLIP_benchmark scores (%)\n"
    )
    print(markdown_table(table) + "\n\n" + markdown_table(differences))


if __name__ == "__main__":
    main()
