"""Deep Compression of LeNet-5 on scikit-learn digits (issue 13), three seeds; and the AlexNet profile.

``python -m benchmarks.compression [--seeds 0 1 2] [--target 0.94] [--alexnet]`` prints two tables;
every field of :class:`Recipe` is an option too (``--retrain-epochs 15 --ft-lr 0.002 ...``).

LeNet-5, per seed: train dense (20 epochs, :func:`sparsecnn.train.fit`), magnitude-prune to
``--target`` (iterative, global threshold, 3 cycles, 30 retrain epochs), quantize (8-bit conv / 5-bit
FC k-means codebooks, linear init, empty clusters kept as in the paper; ``--empty split``
re-seeds them), fine-tune the centroids (5 epochs), Huffman-code codes and 5-bit
relative-index gaps (the paper's LeNet widths) and write the ``.sparsecnn`` file. Reported: held-out
accuracy (450 test images) dense / pruned / quantized / fine-tuned, the storage ratio of the conv+fc
weights (the paper's measure: dense float32 bytes / P+Q+H bytes) and the ratio of the whole file
(biases and header included) to the whole dense float32 model; the mean over seeds. Targets: ratio
>= 35x with <= 0.5 pp accuracy loss (mean). The loaded file is checked to give the fine-tuned model's
outputs (rel 1e-6).

``--alexnet``: the zoo AlexNet (random init, ``deep-compression`` profile, no data), its per-layer
storage against Table 4 of the paper, and the size of its file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

import sparsecnn
from sparsecnn.compress import QuantizeConfig, finetune_centroids, quantize_model, storage_report
from sparsecnn.data import digits
from sparsecnn.io.compressed import load_compressed, save_compressed
from sparsecnn.prune.pipeline import PruneConfig, prune_model
from sparsecnn.train import TrainConfig, evaluate, fit


@dataclass(frozen=True)
class Recipe:
    """The LeNet-5 compression recipe (defaults: the measured one in docs/compression.md)."""

    target: float = 0.94  # fraction of conv+fc weights pruned (global magnitude threshold)
    cycles: int = 3  # iterative prune -> retrain cycles (Han et al. 2015)
    retrain_epochs: int = 30  # split across the cycles (15 measured 0.44 pp mean loss, 30: 0.30 pp)
    retrain_lr: float = 0.01
    conv_bits: int = 8  # the paper's widths (Sec. 3)
    fc_bits: int = 5
    ft_epochs: int = 5  # centroid fine-tuning (Sec. 3.3)
    ft_lr: float = 0.005
    ft_weight_decay: float = 1e-4  # L2 on the centroids (TrainConfig's default)
    empty: str = "keep"  # k-means clusters left empty: "keep" (the paper's) or "split" (re-seeded)


def run_seed(seed: int, recipe: Recipe, index_bits: int, workdir: str) -> dict:
    splits = digits()
    torch.manual_seed(seed)
    model = sparsecnn.models.build("lenet5", num_classes=10, in_channels=1, input_size=8, seed=seed)
    fit(model, splits.train, splits.test, TrainConfig(seed=seed, progress=False))
    dense_acc = evaluate(model, splits.test)
    dense_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    cfg = PruneConfig(method="magnitude", target=recipe.target, schedule="iterative", cycles=recipe.cycles,
                      policy="global", retrain=TrainConfig(epochs=recipe.retrain_epochs, lr=recipe.retrain_lr,
                                                           seed=seed, progress=False))
    model, _ = prune_model(model, splits.train, splits.test, cfg)
    pruned_acc = evaluate(model, splits.test)
    books = quantize_model(model, QuantizeConfig(conv_bits=recipe.conv_bits, fc_bits=recipe.fc_bits,
                                                 empty=recipe.empty))
    quant_acc = evaluate(model, splits.test)
    ft = TrainConfig(epochs=recipe.ft_epochs, lr=recipe.ft_lr, weight_decay=recipe.ft_weight_decay, seed=seed,
                     progress=False)
    books, _ = finetune_centroids(model, books, splits.train, splits.test, ft)
    tuned_acc = evaluate(model, splits.test)
    report = storage_report(books, index_bits, paper="lenet5")
    path = os.path.join(workdir, f"lenet5-{seed}.sparsecnn")
    save_compressed(model, books, path, index_bits=index_bits)
    loaded = load_compressed(path)
    model.eval()
    x = splits.test.tensors[0]
    with torch.no_grad():
        ref, out = model(x), loaded(x)
    rel = float((out - ref).norm() / ref.norm())
    assert rel <= 1e-6, f"round trip off by {rel}"
    size = os.path.getsize(path)
    return {"seed": seed, "dense_acc": dense_acc, "pruned_acc": pruned_acc, "quant_acc": quant_acc,
            "tuned_acc": tuned_acc, "loss_pp": 100 * (dense_acc - tuned_acc), "ratio": report.ratio,
            "file_bytes": size, "dense_model_bytes": dense_bytes, "file_ratio": dense_bytes / size,
            "round_trip_rel": rel, "kept": report.rows()[-1]["kept"], "report": report}


def lenet(seeds: list[int], recipe: Recipe, index_bits: int) -> list[dict]:
    print(f"LeNet-5 on digits: {recipe}, Huffman ({index_bits}-bit gaps); accuracy on the 450 held-out "
          "images")
    print(f"{'seed':>4s} {'dense':>7s} {'pruned':>7s} {'quant':>7s} {'tuned':>7s} {'loss pp':>8s} "
          f"{'kept':>6s} {'ratio':>7s} {'file B':>8s} {'file ratio':>10s}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for s in seeds:
            r = run_seed(s, recipe, index_bits, d)
            rows.append(r)
            print(f"{s:4d} {r['dense_acc']:7.2%} {r['pruned_acc']:7.2%} {r['quant_acc']:7.2%} "
                  f"{r['tuned_acc']:7.2%} {r['loss_pp']:8.2f} {r['kept']:6.1%} {r['ratio']:6.1f}x "
                  f"{r['file_bytes']:8,d} {r['file_ratio']:9.1f}x", flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("dense_acc", "tuned_acc", "loss_pp", "ratio",
                                                              "file_ratio")}
    print(f"mean {mean['dense_acc']:7.2%} {'':7s} {'':7s} {mean['tuned_acc']:7.2%} {mean['loss_pp']:8.2f} "
          f"{'':6s} {mean['ratio']:6.1f}x {'':8s} {mean['file_ratio']:9.1f}x")
    print("ratio: conv+fc weights, dense float32 / P+Q+H (the paper's 39x); file ratio: whole dense model / "
          "file. Targets: ratio >= 35x, loss <= 0.5 pp")
    from sparsecnn.cli.compress import print_table

    print_table(rows[0]["report"], f"LeNet-5 seed {seeds[0]}: storage per layer")
    return rows


def alexnet(empty: str = "keep") -> dict:
    from sparsecnn.cli.compress import print_table

    model = sparsecnn.models.build("alexnet").eval()
    sparsecnn.models.apply_profile(model, "deep-compression")
    books = quantize_model(model, QuantizeConfig(empty=empty))
    report = storage_report(books, 4, paper="alexnet")
    print_table(report, f"AlexNet (zoo, random init), deep-compression profile, 8/5-bit codes, 4-bit gaps, "
                f"empty clusters: {empty}")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "alexnet.sparsecnn")
        save_compressed(model, books, path, index_bits=4)
        size = os.path.getsize(path)
    dense = report.total("dense_bytes")
    print(f"file: {size:,} bytes; P+Q+H arithmetic {report.total('huffman_bytes'):,.0f} bytes; "
          f"weights {dense / report.total('huffman_bytes'):.1f}x, file vs dense weights {dense / size:.1f}x")
    return {"ratio": report.ratio, "file_bytes": size, "rows": report.rows()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for f in fields(Recipe):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    ap.add_argument("--index-bits", type=int, default=5, help="gap bits (the paper's LeNet: 5)")
    ap.add_argument("--alexnet", action="store_true", help="also the AlexNet storage table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})
    rows = lenet(args.seeds, recipe, args.index_bits)
    out = {"recipe": asdict(recipe), "lenet5": [{k: v for k, v in r.items() if k != "report"} for r in rows]}
    if args.alexnet:
        out["alexnet"] = alexnet(recipe.empty)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
