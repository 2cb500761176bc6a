"""Train the dermoscopy classifier from the shared HAM10000 data.

    python -m models.train --config models/configs/lite0.toml [--out models/checkpoints/run]

One command per stage: makes (or reuses) the lesion-level split, fine-tunes an
ImageNet-pretrained EfficientNet-Lite, checkpoints every epoch and resumes from
the last checkpoint, keeps the best epoch by validation score, then calibrates
and exports ONNX (``models.export``). A config may warm-start from an earlier
stage's checkpoint (``[model] init_from``), which is how the shipped recipe
unfreezes more of the network for a second, longer stage on 2 CPU cores.
Needs the ``train`` extra (torch).
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference.engine import load_image
from inference.result import CLASSES
from models.arch import build_model
from models.selection import (
    ham_dx_type,
    isic_rows,
    load_images,
    predict_logits,
    score,
    to_tensor,
    validation_metrics,
)
from models.augment import AugmentConfig, augment
from models.split import load_split, make_split


def _cosine_tail(opt: torch.optim.Optimizer, steps: int, state: dict | None) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay from each group's current lr to 0 over ``steps`` (restored from ``state`` when resuming)."""
    import math
    if state and "tail_base" in state:
        for g, base in zip(opt.param_groups, state["tail_base"]):
            g["initial_lr"] = base
        done = state["last_epoch"]
    else:
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
        done = 0
    total = steps + done
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)), last_epoch=done - 1 if done else -1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--out", type=Path, help="checkpoint folder (default: the config's [train] out_dir)")
    ap.add_argument("--epochs", type=int, help="override the config's epoch count")
    ap.add_argument("--limit", type=int, help="use only N training images (smoke test)")
    args = ap.parse_args(argv)
    cfg = tomllib.loads(args.config.read_text())
    d, mc, pp, tc = cfg["data"], cfg["model"], cfg["preprocess"], cfg["train"]
    acfg = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["augment"].items()})
    epochs = args.epochs or tc["epochs"]
    args.out = args.out or Path(tc.get("out_dir", "models/checkpoints/run"))
    torch.set_num_threads(tc.get("threads", 2))
    torch.manual_seed(d["seed"])
    # The augmentation stream. A warm-started stage that keeps the data seed replays
    # the earlier stage's exact augmented images (lower loss on draws it has seen).
    aug_seed = tc.get("aug_seed", d["seed"])
    rng = np.random.default_rng(aug_seed)

    ham = Path(d["ham_dir"])
    split_file = Path(d["split_file"])
    if not split_file.exists():
        make_split(ham / "metadata.csv", split_file, d["seed"], d["val_fraction"], d["test_fraction"])
    rows = load_split(split_file)
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    if args.limit:
        train_rows = train_rows[: args.limit]
        val_rows = val_rows[: max(args.limit // 4, 64)]
    size = mc["input_size"]
    t0 = time.time()
    train_imgs = load_images(ham, [r["image_id"] for r in train_rows])
    y_train = np.array([CLASSES.index(r["dx"]) for r in train_rows])
    x_val = np.stack([to_tensor(im, size, pp) for im in load_images(ham, [r["image_id"] for r in val_rows])])
    y_val = np.array([CLASSES.index(r["dx"]) for r in val_rows])
    # Per-image loss weights by how the label was confirmed ("dx:dx_type" -> factor):
    # up-weight excised naevi, the hard negatives (issue 10).
    dx_type = ham_dx_type(ham)
    sw_cfg: dict = tc.get("sample_weight", {})
    sample_w = [float(sw_cfg.get(f"{r['dx']}:{dx_type.get(r['image_id'], '')}", 1.0)) for r in train_rows]
    val_dx_types = [dx_type.get(r["image_id"], "") for r in val_rows] if d.get("hard_case_selection") else None
    x_isic = y_isic = None
    if d.get("isic_dir"):
        isic = Path(d["isic_dir"])
        it = isic_rows(isic, "train")
        iv = isic_rows(isic, "val")
        if args.limit:
            it, iv = it[: args.limit // 4], iv[:32]
        train_imgs += [load_image(isic / "images" / f"{r['image_id']}.jpg") for r in it]
        y_train = np.concatenate([y_train, [CLASSES.index(r["dx"]) for r in it]]).astype(int)
        sample_w += [float(sw_cfg.get(f"{r['dx']}:isic", 1.0)) for r in it]
        x_isic = np.stack([to_tensor(load_image(isic / "images" / f"{r['image_id']}.jpg"), size, pp) for r in iv])
        y_isic = np.array([CLASSES.index(r["dx"]) for r in iv])
    w_train = np.asarray(sample_w, np.float32)
    print(f"loaded {len(train_imgs)} train / {len(x_val)} val images"
          f"{'' if x_isic is None else f' / {len(x_isic)} ISIC val'} in {time.time() - t0:.0f}s", flush=True)

    counts = np.bincount(y_train, minlength=len(CLASSES)).astype(float)
    weights = (counts.sum() / np.maximum(counts, 1)) ** tc["class_weight_power"]
    weights = weights / (weights * counts).sum() * counts.sum()
    class_w = torch.tensor(weights, dtype=torch.float32)
    ce = nn.CrossEntropyLoss(reduction="none", label_smoothing=tc.get("label_smoothing", 0.0))

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
        """Class- and sample-weighted mean (with all sample weights 1: the 1.x loss)."""
        w = class_w[y] * sw
        return (ce(logits, y) * w).sum() / w.sum()

    model = build_model(mc["arch"], mc["dropout"])
    init_from = mc.get("init_from")
    if init_from and not (args.out / "last.pt").exists():
        model.load_state_dict(torch.load(init_from, weights_only=False)["model"])
        print(f"warm start from {init_from}", flush=True)
    init_onnx = mc.get("init_from_onnx")
    if init_onnx and not (args.out / "last.pt").exists():
        # A shipped model whose checkpoints are gone: its ONNX graph, BatchNorm folded
        # (models/from_onnx.py); train with freeze_bn so the folding holds.
        from models.from_onnx import members_from_onnx
        members = members_from_onnx(init_onnx, mc["arch"], int(mc.get("init_members", 1)), mc["dropout"],
                                    int(mc.get("init_input_size", size)))
        model = members[int(mc.get("init_member", 0))]
        print(f"warm start from {init_onnx} member {mc.get('init_member', 0)}", flush=True)
    freeze_bn = bool(tc.get("freeze_bn", False))
    # Freezing the stem and first blocks (generic edges and textures) halves the
    # backward cost at full resolution, which is what lets this finish on 2 CPU cores.
    for mod in [model._conv_stem, model._bn0, *model._blocks[: mc.get("freeze_blocks", 0)]]:
        for prm in mod.parameters():
            prm.requires_grad_(False)
    head = list(model._fc.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    opt = torch.optim.AdamW([{"params": body, "lr": tc["backbone_lr"]}, {"params": head, "lr": tc["lr"]}],
                            weight_decay=tc["weight_decay"])
    steps_per_epoch = (len(train_imgs) + tc["batch_size"] - 1) // tc["batch_size"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[tc["backbone_lr"], tc["lr"]],
                                                total_steps=epochs * steps_per_epoch, pct_start=0.1)
    args.out.mkdir(parents=True, exist_ok=True)
    last, best_path, log_path = args.out / "last.pt", args.out / "best.pt", args.out / "log.jsonl"
    start_epoch, best_score, sched_kind = 0, -1.0, "onecycle"
    if last.exists():
        ck = torch.load(last, weights_only=False)
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"])
        start_epoch, best_score = ck["epoch"] + 1, ck["best_score"]
        planned = ck.get("epochs") or ck["sched"].get("total_steps", 0) // steps_per_epoch
        if planned == epochs and ck.get("sched_kind", "onecycle") == "onecycle":
            sched.load_state_dict(ck["sched"])
        else:
            # The epoch budget changed on resume (e.g. shortened to finish in time on a
            # busy CPU): anneal from the current learning rate to zero over what is left.
            sched = _cosine_tail(opt, (epochs - start_epoch) * steps_per_epoch,
                                 ck.get("tail") if ck.get("sched_kind") == "cosine_tail" else None)
            sched_kind = "cosine_tail"
            print(f"epoch budget changed {planned} -> {epochs}: cosine tail from the current lr", flush=True)
        rng = np.random.default_rng(aug_seed + start_epoch)
        print(f"resumed at epoch {start_epoch} (best score {best_score:.4f})", flush=True)

    for epoch in range(start_epoch, epochs):
        model.train()
        if freeze_bn:  # running statistics stay those of the warm start (see init_from_onnx)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        order = rng.permutation(len(train_imgs))
        t_ep, seen, loss_sum = time.time(), 0, 0.0
        for step in range(steps_per_epoch):
            idx = order[step * tc["batch_size"]:(step + 1) * tc["batch_size"]]
            xb = np.stack([to_tensor(augment(train_imgs[i], rng, acfg), size, pp) for i in idx])
            logits = model(torch.from_numpy(xb))
            loss = loss_fn(logits, torch.from_numpy(y_train[idx]), torch.from_numpy(w_train[idx]))
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
            seen += len(idx); loss_sum += float(loss.detach()) * len(idx)
            if step % 20 == 0:
                rate = seen / (time.time() - t_ep)
                print(f"  epoch {epoch + 1}/{epochs} step {step}/{steps_per_epoch} "
                      f"loss {loss_sum / seen:.4f} {rate:.1f} img/s", flush=True)
        metrics = validation_metrics(predict_logits(model, x_val), y_val, val_dx_types,
                                     None if x_isic is None else predict_logits(model, x_isic), y_isic)
        val_score = score(metrics)
        line = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "seconds": round(time.time() - t_ep),
                **{f"val_{k}": round(v, 4) for k, v in metrics.items()}, "score": round(val_score, 4)}
        print(json.dumps(line), flush=True)
        with log_path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        if val_score > best_score:
            best_score = val_score
            torch.save({"model": model.state_dict(), "epoch": epoch, "metrics": metrics, "config": cfg}, best_path)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "epoch": epoch, "best_score": best_score, "epochs": epochs, "sched_kind": sched_kind,
                    "tail": {"tail_base": [g.get("initial_lr") for g in opt.param_groups],
                             "last_epoch": sched.last_epoch}}, last)
    print(f"training done; best validation score {best_score:.4f}; exporting", flush=True)
    from models.export import export
    # The config may name an ensemble of checkpoints to ship instead of the best epoch alone.
    ckpts = [Path(c) for c in cfg.get("export", {}).get("checkpoints", [])] or [best_path]
    export(args.config, ckpts, Path("models"))


if __name__ == "__main__":
    main()
