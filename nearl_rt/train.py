"""`python -m nearl_rt.train`: few-shot training of NEARL-CLIP (or a baseline) on labelled images.

NEARL and CoOp train for a fixed number of optimizer steps (--steps, rounded up to whole epochs) whatever
K is, or for --epochs. RUN_DIR receives: run.json (the run's settings), config.yaml (every option, resolved:
`--config RUN/config.yaml --out NEW` trains the same run again), shots.json (the K-shot indices),
metrics.jsonl (one line per epoch), last.pt (the final model) and best.pt (the epoch with the lowest
validation loss, a tie going to the later epoch; nearl_rt checkpoints) and train_state.pt (adapter +
optimizer + RNG state, for --resume). Every file is written atomically. When the last epoch is done, the
temperature and decision thresholds (--operating-point) of last.pt and best.pt are fitted on the validation
shots and stored in them (nearl_rt.calibrate). --report-to tensorboard,mlflow also reports the run
(nearl_rt.tracking).
Multi-process: `torchrun --nproc_per_node N -m nearl_rt.train ...` (DistributedDataParallel; gloo on
CPU, nccl on CUDA); each global batch is split across processes, so N processes follow the
single-process run up to floating-point summation order.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import nearl_rt
from nearl_rt.calibrate import calibrate_checkpoint, describe, logits_of
from nearl_rt.calibration import DEFAULT_RULE, RULE_HELP, CalibrationError, OperatingPointRule
from nearl_rt.core.atomic import atomic_output
from nearl_rt.checkpoint import non_finite_tensor
from nearl_rt.classifier import METHODS, Classifier, load_classifier, resolve_device
from nearl_rt.classsets import restrict, split_base_novel
from nearl_rt.core.cli import run_cli
from nearl_rt.config_file import add_config_argument, parse_with_config, resolved_options, write_config
from nearl_rt.coop import DEFAULT_CONTEXT, attach_context, coop_template
from nearl_rt.data import (Dataset, Preprocess, add_image_arguments, add_label_arguments, dataset_from_args,
                           intensity_from_args, load_images, parse_classes, skip_summary)
from nearl_rt.core.errors import NearlError, RandomBackboneWarning
from nearl_rt.linear_probe import fit_linear_probe, fit_multilabel_probe
from nearl_rt.methods import REGISTRY, get_method, trainable_count
from nearl_rt import multilabel
from nearl_rt.multilabel import calibrate_findings, entry_hits, masked_bce
from nearl_rt.multilabel import describe as describe_findings
from nearl_rt.prompts import DEFAULT_NEGATIVE, load_templates
from nearl_rt.dassl_splits import shots_from_selection
from nearl_rt.sampling import sample_shots
from nearl_rt.tracking import Tracker, add_tracking_arguments, parse_report_to

# Settings that define a run: --resume refuses to continue a run with different ones.
RUN_KEYS = ("data", "image_root", "classes", "template", "preset", "pretrained", "interaction", "method", "shots",
            "seed", "epochs", "steps", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs", "grad_clip",
            "hflip", "skip_bad_images", "intensity", "dicom_voi", "frames", "templates", "coop_context", "base_to_novel",
            "base_classes", "novel_classes", "operating_point", "multi_label", "uncertain", "negative_template",
            "class_descriptions", "fewshot_file")
# What runs recorded before a key existed did (they resume under it).
RUN_KEY_DEFAULTS = {"steps": None, "intensity": "minmax", "dicom_voi": "file", "frames": "refuse", "templates": None,
                    "coop_context": DEFAULT_CONTEXT, "base_to_novel": False, "base_classes": None, "novel_classes": None,
                    "operating_point": DEFAULT_RULE, "multi_label": False, "uncertain": "ignore",
                    "negative_template": DEFAULT_NEGATIVE, "class_descriptions": None, "fewshot_file": None}
STATE = "train_state.pt"
# Options of one invocation, not of the run: left out of its config.yaml. Paths in it are absolute.
INVOCATION_OPTIONS = ("resume", "stop_after")
PATH_OPTIONS = ("data", "image_root", "pretrained")
EPOCH_METHODS = tuple(m for m in METHODS if REGISTRY[m].steps)  # --steps / --epochs; the others: fitted in one go
# The training budget when --epochs is not given: the same number of optimizer steps at every K (an epoch of
# K shots x C classes is ceil(K * C / batch) steps, 1 or 2 for K <= 16 on two classes). Measured in
# docs/protocols.md ("The training recipe").
DEFAULT_STEPS = 200
FEW_VALIDATION = 10  # validation images per class below which the log calls best.pt's choice noisy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearl_rt.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="image folder tree, split .json, MedMNIST .npz, or a multi-label "
                                                 ".csv manifest")
    p.add_argument("--image-root", help="folder the split JSON's / manifest's paths are relative to (default: its "
                                        "folder)")
    p.add_argument("--classes", "--data-classes", dest="classes",
                   help="comma-separated names of the data's labels, in label order (default: from the data, or "
                        "MedMNIST's names by the .npz file's name); they become the prompts. Multi-label: the names "
                        "of an .npz's finding columns, or the manifest's findings to keep")
    add_label_arguments(p)
    p.add_argument("--template", default="a medical image showing {}.",
                   help="prompt template, one '{}' (multi-label: the positive prompt of each finding)")
    p.add_argument("--negative-template", default=DEFAULT_NEGATIVE, metavar="TEMPLATE|NAME|FILE",
                   help=f"multi-label: each finding's negative prompt (default {DEFAULT_NEGATIVE!r}); a template, or "
                        f"an ensemble as for --templates")
    p.add_argument("--templates", metavar="NAME|FILE",
                   help="prompt ensemble instead of --template: a shipped set (xray, ct, mri, histology, dermoscopy, "
                        "fundus), a .txt file (one template per line) or a .json file (a list of templates, or "
                        "BiomedCoOp's {class: [prompts]})")
    p.add_argument("--preset", default="vit_b16", choices=sorted(nearl_rt.PRESETS))
    p.add_argument("--pretrained", help="local open_clip / OpenAI CLIP weights file, or a model download folder "
                   "(BiomedCLIP: open_clip_config.json + weights + tokenizer files); default: random backbone")
    p.add_argument("--interaction", default="bidirectional", choices=["bidirectional", "text_cacheable"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--method", default="nearl", metavar="NAME",
                   help=f"what is trained: {', '.join(METHODS)} (docs/protocols.md#methods) [nearl]")
    p.add_argument("--coop-context", type=int, default=DEFAULT_CONTEXT,
                   help="coop, kgcoop, cocoop, biomedcoop: number of learned context vectors (4 starts from "
                        "'a photo of a')")
    p.add_argument("--class-descriptions", metavar="FILE.json",
                   help="biomedcoop: the classes' descriptions, {\"class name\": [\"description\", ...]} (e.g. "
                        "BiomedCoOp's LLM prompt sets)")
    p.add_argument("--base-to-novel", action="store_true",
                   help="train on the base classes only (the first half in the dataset's class order)")
    p.add_argument("--base-classes", help="comma-separated base classes (implies --base-to-novel)")
    p.add_argument("--novel-classes", help="comma-separated novel classes (default: all other classes)")
    p.add_argument("--shots", type=int, required=True, help="K training images per class")
    p.add_argument("--fewshot-file", metavar="FILE.pkl",
                   help="take the K shots from a Dassl / BiomedCoOp selection (split_fewshot/shot_K-seed_S.pkl, "
                        "read without running it) instead of drawing them; --data is the dataset's split JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help=f"optimizer steps, rounded up to whole epochs (default: {DEFAULT_STEPS} "
                                             "when --epochs is not given)")
    p.add_argument("--epochs", type=int, help="train exactly N epochs instead of a number of --steps")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (split across processes)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="optimizer weight decay (the linear probe picks its L2 strength on the validation shots)")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--operating-point", default=DEFAULT_RULE, metavar="RULE",
                   help=f"how last.pt's and best.pt's decision thresholds are chosen on the validation shots: "
                        f"{RULE_HELP} (default: youden)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (off: they change anatomy)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip (and count) unreadable images")
    add_image_arguments(p, training=True)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N epochs of this invocation (continue later with --resume)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_tracking_arguments(p)
    add_config_argument(p)
    return p


def run_config(args) -> dict:
    """The run's options as its config.yaml records them (build_parser's, resolved)."""
    values = resolved_options(build_parser(), args, skip=INVOCATION_OPTIONS)
    return {k: os.path.abspath(v) if k in PATH_OPTIONS and v is not None else v for k, v in values.items()}


# ------------------------------------------------------------------------------------------ helpers
class Dist:
    """Process-group facts; world 1 when not launched by torchrun."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device_arg)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", local)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def write_json(path: Path, obj) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def write_log(path: Path, records: list) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_log(path: Path, upto_epoch: int) -> list:
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("epoch", 0) <= upto_epoch]


def check_out_dir(out: Path, settings: dict, resume: bool) -> bool:
    """Refuse to mix runs. Returns True when a run is there to resume."""
    if out.exists() and not out.is_dir():
        raise NearlError(f"--out {out} is a file; choose a directory")
    run_file = out / "run.json"
    if not run_file.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise NearlError(f"--out {out} exists and is not a nearl-rt run directory (no run.json); choose a new --out")
        return False
    try:
        stored = json.loads(run_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NearlError(f"{run_file} is damaged; choose a new --out") from None
    differ = [f"{k}: run has {stored.get(k, RUN_KEY_DEFAULTS.get(k))!r}, now {settings[k]!r}" for k in RUN_KEYS
              if stored.get(k, RUN_KEY_DEFAULTS.get(k)) != settings[k]]
    if not resume:
        what = "a different run" if differ else "this run"
        raise NearlError(f"--out {out} already holds {what} (run.json); pass --resume to continue it, "
                         f"or choose a new --out")
    if differ:
        raise NearlError(f"--resume: {out} holds a different run ({'; '.join(differ)})")
    return (out / STATE).is_file()


def make_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NearlError(f"cannot create output directory {out}: {e.strerror} (choose a writable --out)") from None
    if not os.access(out, os.W_OK):
        raise NearlError(f"output directory {out} is not writable (choose a writable --out)")


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means a damaged file
        raise NearlError(f"{path} is damaged ({e.__class__.__name__}); resume from a copy or start a new --out") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise NearlError(f"{path} is not a nearl-rt training state; start a new --out")
    return state


def steps_per_epoch(images: int, batch_size: int) -> int:
    return math.ceil(images / batch_size)


def plan_epochs(images: int, batch_size: int, epochs: Optional[int], steps: Optional[int]) -> int:
    """The epochs a run trains: --epochs as given, else --steps optimizer steps rounded up to whole epochs."""
    return epochs if epochs is not None else math.ceil(steps / steps_per_epoch(images, batch_size))


def replaces_best(record: dict, best: Optional[dict]) -> bool:
    """Whether this epoch becomes best.pt: the lowest validation loss so far, a tie going to the later epoch
    (a run that does not change its model ends with best.pt = last.pt, never an earlier epoch)."""
    return best is None or record["val_loss"] <= best["val_loss"]


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- data
def prepare_data(args) -> tuple[Dataset, dict, tuple, tuple, list]:
    """Read the data, drop unreadable images if asked, draw the K shots, decode the chosen images."""
    ds = dataset_from_args(args, args.classes)
    class_split = {}
    b2n = args.base_to_novel or args.base_classes is not None
    if ds.multi_label and (b2n or args.method not in multilabel.METHODS):
        raise NearlError(f"{args.data} is multi-label: --base-to-novel and --method {args.method} are single-label only "
                         f"(multi-label methods: {', '.join(multilabel.METHODS)})")
    if args.base_to_novel or args.base_classes is not None:
        base, novel = split_base_novel(ds.class_names, parse_classes(args.base_classes),
                                       parse_classes(args.novel_classes))
        ds = restrict(ds, base)  # training and validation see base-class images only
        class_split = {"base_classes": base, "novel_classes": novel}
    elif args.novel_classes is not None:
        raise NearlError("--novel-classes needs --base-to-novel or --base-classes")
    skipped = []
    if args.skip_bad_images:  # check every candidate first, so the shots are drawn among readable images
        for name in {"train", "val", "all"} & set(ds.splits):
            _, ok, bad = load_images(ds.splits[name], skip_bad=True, intensity=args.policy)
            ds.splits[name] = ds.splits[name].subset(ok)
            skipped += bad
    if args.fewshot_file and class_split:
        raise NearlError("--fewshot-file gives the shots of all classes; it does not combine with --base-to-novel")
    drawn = shots_from_selection(ds, args.fewshot_file, args.shots, args.seed) if args.fewshot_file else \
        sample_shots(ds, args.shots, args.seed)
    shots = {**drawn, **class_split}
    train_split, val_split = ds.split(shots["train_split"]), ds.split(shots["val_split"])
    shots["train_images"] = [train_split.describe(i) for i in shots["train"]]
    shots["val_images"] = [val_split.describe(i) for i in shots["val"]]
    train = train_split.subset(shots["train"])
    val = val_split.subset(shots["val"])
    train_images, _, _ = load_images(train, intensity=args.policy)
    val_images, _, _ = load_images(val, intensity=args.policy)
    return ds, shots, (train_images, train.labels), (val_images, val.labels), skipped


# --------------------------------------------------------------------------------------- training
def evaluate_batches(classifier: Classifier, images: torch.Tensor, labels: np.ndarray, batch: int = 64) -> dict:
    """Validation loss and accuracy (multi-label: masked BCE, and the fraction of known labels decided right at
    p >= 0.5)."""
    classifier.model.eval()
    with torch.no_grad():
        logits = torch.cat([classifier.logits(images[i:i + batch]).float() for i in range(0, len(images), batch)])
    target = torch.from_numpy(labels).to(logits.device)
    if classifier.multi_label:
        hits, count = entry_hits(logits, target)
        return {"loss": masked_bce(logits, target).item(), "accuracy": hits / max(count, 1)}
    return {"loss": F.cross_entropy(logits, target).item(), "accuracy": (logits.argmax(-1) == target).float().mean().item()}


def batch_objective(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> tuple[torch.Tensor, int, int]:
    """(the batch's loss summed over its images, labels decided right, labels counted): cross-entropy and argmax
    hits per image, or masked BCE (nearl_rt.multilabel) and hits per known (image, finding) label."""
    if multi_label:
        return (masked_bce(logits, y, reduction="sum"), *entry_hits(logits, y))
    return F.cross_entropy(logits, y, reduction="sum"), int((logits.argmax(-1) == y).sum()), len(y)


def all_finite(loss: torch.Tensor, d: Dist) -> bool:
    """Whether every process's loss is finite (all of them stop together)."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if d.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def diverged(out: Path, done_epochs: int, what: str) -> NearlError:
    """The error that stops a run whose loss or weights turned NaN/Inf; nothing of that epoch is saved."""
    kept = f"the last good checkpoint is {out / 'last.pt'} (epoch {done_epochs})" if done_epochs else \
        "no checkpoint was written"
    return NearlError(f"training stopped in epoch {done_epochs + 1}: {what} (the run diverged); {kept}. Start a new "
                      f"--out with a lower --lr or --grad-clip")


def train_nearl(args, d: Dist, model, train, val, out: Path, resume_state, log: list, tracker: Tracker) -> None:
    preprocess = Preprocess(model.preprocess_cfg, hflip=args.hflip, intensity=args.policy)
    train_images, train_labels = train
    val_x = preprocess.eval(val[0]).to(d.device)
    val_y = val[1]
    n = len(train_labels)
    if args.batch_size < d.world:
        raise NearlError(f"--batch-size {args.batch_size} is smaller than the {d.world} processes; raise it")
    if d.world > 1 and model.prompt_context is not None and model.prompt_context.conditional:
        raise NearlError(f"--method {args.method} trains in one process (its per-image prompts run outside "
                         f"DistributedDataParallel); run it without torchrun")
    per_epoch = steps_per_epoch(n, args.batch_size)
    total, warmup = per_epoch * args.epochs, int(round(args.warmup_epochs * per_epoch))
    params = trainable_parameters(model)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    start_epoch, best = 0, None
    if resume_state is not None:
        model.load_adapter_state_dict(resume_state["adapter"])
        if model.prompt_context is not None:
            saved = resume_state["context"]  # {name: tensor}; a plain tensor: CoOp's context (older runs)
            saved = {"ctx": saved} if isinstance(saved, torch.Tensor) else saved
            with torch.no_grad():
                for name, p in model.prompt_context.named_parameters():
                    p.copy_(saved[name])
        opt.load_state_dict(resume_state["optimizer"])
        set_rng_state(resume_state["rng"])
        start_epoch, best = resume_state["epoch"], resume_state["best"]
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else nullcontext()
    classifier = Classifier(model, args.method)
    end_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    for epoch in range(start_epoch, end_epoch):
        t0 = time.perf_counter()
        model.train()
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        aug_seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(total=per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=args.no_progress or not d.main, file=sys.stderr)
        for step in range(per_epoch):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            if len(batch) < d.world:  # too few images to give every process one
                continue
            mine = np.array_split(np.asarray(batch), d.world)[d.rank].tolist()
            lr = lr_at(epoch * per_epoch + step, total, warmup, args.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            x = preprocess.augment([train_images[i] for i in mine], [aug_seeds[i] for i in mine]).to(d.device)
            y = torch.from_numpy(train_labels[mine]).to(d.device)
            context = model.prompt_context
            with amp:
                logits = (classifier.logits(x) if context is not None and context.conditional
                          else net(x, model.class_tokens)).float()
            # sum over this process's images / global batch * world: DDP's averaging then gives the global mean
            loss_sum_batch, hits, counted = batch_objective(logits, y, model.multi_label)
            loss = loss_sum_batch * (d.world / len(batch))
            extra_loss = None if context is None else context.extra_loss(model, x, logits)
            if extra_loss is not None:  # the method's regulariser (KgCoOp, BiomedCoOp)
                loss = loss + extra_loss
            if not all_finite(loss, d):
                raise diverged(out, epoch, f"the training loss is not finite ({loss.item()}) at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            tracker.metrics({"step/loss": loss.item() * len(batch) / d.world / len(mine), "step/lr": lr},
                            epoch * per_epoch + step + 1)
            loss_sum += loss.item() * len(batch) / d.world
            correct += hits
            seen += counted
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item() * len(batch) / d.world / len(mine):.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        if d.world > 1:  # the epoch's loss and accuracy over all processes
            stats = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
            dist.all_reduce(stats)
            loss_sum, correct, seen = stats[0].item(), int(stats[1]), int(stats[2])
        train_time = time.perf_counter() - t0
        bad = non_finite_tensor({**model.adapter_state_dict(), **context_parameters(model)})
        if bad:
            raise diverged(out, epoch, f"adapter tensor {bad} became NaN or Inf")
        val_metrics = evaluate_batches(classifier, val_x, val_y)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / n, "train_accuracy": correct / max(seen, 1),
                  "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
                  "epoch_time_s": train_time}
        improved = replaces_best(record, best)
        if improved:
            best = {"epoch": epoch + 1, "val_accuracy": record["val_accuracy"], "val_loss": record["val_loss"]}
        if d.main:
            extra = {**classifier.checkpoint_extra(), **args.class_split, "intensity": args.policy.to_dict(),
                     "epoch": epoch + 1, "seed": args.seed, "shots": args.shots,
                     "val_accuracy": record["val_accuracy"], "val_loss": record["val_loss"]}
            nearl_rt.save_checkpoint(model, out / "last.pt", extra=extra)
            if improved:
                nearl_rt.save_checkpoint(model, out / "best.pt", extra=extra)
            log.append(record)
            write_log(out / "metrics.jsonl", log)
            tracker.metrics(epoch_scalars(record), record["epoch"])
            state = {"epoch": epoch + 1, "best": best,
                     "adapter": {k: v.detach().cpu() for k, v in model.adapter_state_dict().items()},
                     **({} if model.prompt_context is None else {"context": context_parameters(model)}),
                     "optimizer": opt.state_dict(), "rng": rng_state()}
            with atomic_output(out / STATE) as tmp:
                torch.save(state, tmp)
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f}, val loss "
                  f"{record['val_loss']:.4f}, val acc {record['val_accuracy']:.4f}, {train_time:.1f} s", flush=True)
        d.barrier()


def epoch_scalars(record: dict) -> dict:
    """A metrics.jsonl record as tracked scalars (step: its epoch)."""
    return {k: v for k, v in record.items() if k != "epoch"}


def trainable_parameters(model) -> list:
    """What the optimizer moves: NEARL's adapters, or a prompt learner's context (and CoCoOp's meta-net)."""
    return model.adapter_parameters() if model.prompt_context is None else list(model.prompt_context.parameters())


def context_parameters(model) -> dict:
    """A prompt learner's trained tensors by name (none for other methods), detached on the CPU."""
    context = model.prompt_context
    return {} if context is None else {n: p.detach().cpu().clone() for n, p in context.named_parameters()}


def train_baseline(args, model, train, val, out: Path, tracker: Tracker) -> None:
    """zeroshot (no training), linear_probe (logistic regression on frozen features, its L2 strength
    chosen on the validation shots) or a feature-level head (nearl_rt.feature_fit): one step, no epochs."""
    preprocess = Preprocess(model.preprocess_cfg, intensity=args.policy)
    device = model.class_tokens.device
    head, probe, fitted = None, {}, {}
    model.eval()
    val_x = preprocess.eval(val[0]).to(device)
    if args.method == "linear_probe":
        fit = fit_multilabel_probe if model.multi_label else fit_linear_probe
        try:
            head, probe = fit(model, preprocess.eval(train[0]).to(device), train[1], val_x, val[1])
        except ValueError as e:
            raise NearlError(str(e)) from None
        print(f"linear_probe: C = {probe['C']:.3g} (best of {probe['fits']} on the validation shots)")
    elif REGISTRY[args.method].kind == "features":
        from nearl_rt.feature_fit import fit_feature_head
        head, fitted = fit_feature_head(args.method, model, preprocess.eval(train[0]).to(device), train[1], val_x,
                                        val[1], args.seed)
        head = head.to(device).eval()
        bad = non_finite_tensor(head.state_dict())
        if bad:
            raise NearlError(f"{args.method}: the fitted head's {bad} is NaN or Inf (the fit diverged); no checkpoint "
                             f"was written")
        print(f"{args.method}: " + ", ".join(f"{k} {v:.4g}" for k, v in fitted.items()
                                              if isinstance(v, float) and k.startswith(("train_loss", "alpha", "beta"))))
    classifier = Classifier(model, args.method, head)
    val_metrics = evaluate_batches(classifier, val_x, val[1])
    extra = {**classifier.checkpoint_extra(), **args.class_split, "intensity": args.policy.to_dict(), "epoch": 0,
             "seed": args.seed, "shots": args.shots, "val_accuracy": val_metrics["accuracy"],
             "val_loss": val_metrics["loss"], **({"linear_probe_C": probe["C"]} if probe else {}),
             **({"fit": {k: v for k, v in fitted.items() if isinstance(v, (int, float))}} if fitted else {})}
    nearl_rt.save_checkpoint(model, out / "last.pt", extra=extra)
    nearl_rt.save_checkpoint(model, out / "best.pt", extra=extra)
    record = {"epoch": 0, "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"]}
    write_log(out / "metrics.jsonl", [record])
    tracker.metrics(epoch_scalars(record), 0)
    print(f"{args.method}: val loss {val_metrics['loss']:.4f}, val acc {val_metrics['accuracy']:.4f}")


def calibrate_checkpoints(args, out: Path, val, shots: dict, device) -> None:
    """Fit the temperature and --operating-point thresholds of last.pt and best.pt on the validation shots and
    store them in each; a rule the shots cannot meet leaves the file uncalibrated, with a warning naming the fix."""
    for ckpt in (out / "last.pt", out / "best.pt"):
        with warnings.catch_warnings():  # a random backbone was announced when training started
            warnings.simplefilter("ignore", RandomBackboneWarning)
            classifier, _ = load_classifier(ckpt, pretrained=args.pretrained, backend=args.backend, device=device)
        logits = logits_of(classifier, Preprocess(classifier.preprocess_cfg, intensity=args.policy).eval(val[0]))
        if classifier.multi_label:  # per-finding thresholds; a finding whose labels are all one class keeps 0.5
            calibration, unfitted = calibrate_findings(ckpt, logits, val[1], classifier.class_names, args.rule, {
                "data": os.path.abspath(args.data), "split": shots["val_split"], "subset": "the run's validation shots"})
            print(f"calibrated {ckpt}: {describe_findings(calibration, unfitted)}", flush=True)
            continue
        try:
            calibration, report = calibrate_checkpoint(ckpt, logits, val[1], classifier.class_names, args.rule, {
                "data": os.path.abspath(args.data), "split": shots["val_split"], "subset": "the run's validation shots"})
        except CalibrationError as e:
            print(f"warning: {ckpt} is not calibrated: {e}. Calibrate it on more images with `python -m "
                  f"nearl_rt.calibrate {ckpt} --data DATA`", file=sys.stderr)
            continue
        print(f"calibrated {ckpt}: {describe(calibration, report)}", flush=True)


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    return run(parse_with_config(build_parser(), argv))


def run(args: argparse.Namespace) -> int:
    """One training run with build_parser's options: the library entry point behind `python -m nearl_rt.train`
    (the sweep and the demo call it). Returns 0."""
    for name, value in (("--shots", args.shots), ("--epochs", args.epochs), ("--steps", args.steps),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise NearlError(f"{name} must be >= 1, got {value}")
    if args.epochs is not None and args.steps is not None:
        raise NearlError(f"--epochs {args.epochs} and --steps {args.steps} both set the training length; give one")
    if args.epochs is None and args.steps is None:
        args.steps = DEFAULT_STEPS
    if args.stop_after is not None and args.stop_after < 1:
        raise NearlError(f"--stop-after must be >= 1, got {args.stop_after}")
    args.policy = intensity_from_args(args)  # stored in every checkpoint's extra: evaluate / predict / export reuse it
    args.rule = OperatingPointRule.parse(args.operating_point)
    parse_report_to(args.report_to)  # a bad list fails before anything runs
    out = Path(args.out)
    method = get_method(args.method)  # an unknown method: one line naming the registered ones
    if method.prompt_learner and args.templates:
        raise NearlError(f"--method {args.method} learns its own prompt context; --templates does not apply to it")
    if method.needs_descriptions:
        from nearl_rt.prompt_learners import read_descriptions
        read_descriptions(args.class_descriptions, [])  # a missing file fails before anything runs
    templates = load_templates(args.templates) if args.templates else args.template
    negative = load_templates(args.negative_template)
    settings = {k: getattr(args, k) for k in RUN_KEYS}
    settings["data"] = os.path.abspath(args.data)
    config = run_config(args)  # as given (--steps stays --steps)
    d = Dist(args.device)
    try:
        resuming = check_out_dir(out, settings, args.resume)
        ds, shots, train, val, skipped = prepare_data(args)
        args.class_split = {k: shots[k] for k in ("base_classes", "novel_classes") if k in shots}
        if skipped:
            print(skip_summary(skipped), file=sys.stderr)
        args.epochs = plan_epochs(len(train[1]), args.batch_size, args.epochs, args.steps)
        torch.manual_seed(args.seed)  # adapter initialisation
        # prompt learners and feature heads have no adapters (they stay at their zero update): their text never
        # depends on the image
        interaction = "text_cacheable" if method.kind in ("prompt", "features") else args.interaction
        model = nearl_rt.build_model(args.preset, interaction=interaction, backend=args.backend,
                                     pretrained=args.pretrained).to(d.device)
        if method.prompt_learner:
            from nearl_rt.prompt_learners import build_context
            attach_context(model, build_context(args.method, model, ds.class_names, args.coop_context, args.seed,
                                                args.class_descriptions))
            templates = coop_template(args.coop_context)
        if ds.multi_label:
            model.set_findings(ds.class_names, templates, negative)
        else:
            model.set_classes(ds.class_names, templates)
        trainable = trainable_count(args.method, embed_dim=model.embed_dim, text_width=model.text_tower.width,
                                    classes=len(ds.class_names), shots=args.shots, context=args.coop_context,
                                    adapters=model.num_trainable_parameters())
        if d.main:
            per = "positive findings, multi-label" if ds.multi_label else "classes"
            print(f"{args.method} on {args.preset}: {trainable:,} trainable parameters; {len(train[1])} training, "
                  f"{len(val[1])} validation images ({args.shots} shots x {len(ds.class_names)} {per})", flush=True)
            if args.method in EPOCH_METHODS:
                per_epoch = steps_per_epoch(len(train[1]), args.batch_size)
                few = " (so few: a noisy choice)" if len(val[1]) < FEW_VALIDATION * len(ds.class_names) else ""
                print(f"{args.epochs} epochs x {per_epoch} optimizer step(s) = {args.epochs * per_epoch} steps; "
                      f"best.pt: the epoch with the lowest loss on the {len(val[1])} validation images{few}; "
                      f"last.pt: the final model", flush=True)
        resume_state = None
        if resuming:
            resume_state = load_state(out / STATE)
            if resume_state["epoch"] >= args.epochs or args.method not in EPOCH_METHODS:
                print(f"{out} is complete ({args.epochs} epochs); nothing to do")
                return 0
            print(f"resuming {out} after epoch {resume_state['epoch']}")
        created = not out.exists()
        if d.main:
            make_output_dir(out)
        d.barrier()
        try:
            if d.main and not resuming:
                write_json(out / "run.json", settings)
                write_json(out / "shots.json", shots)
                write_config(out / "config.yaml", config,
                             f"python -m nearl_rt.train --config {out / 'config.yaml'} --out NEW trains this run again")
            log = read_log(out / "metrics.jsonl", resume_state["epoch"] if resume_state else 0)
            with Tracker(args.report_to if d.main else "none", out, args.tracking_uri) as tracker:
                tracker.params(config)
                if args.method in EPOCH_METHODS:
                    train_nearl(args, d, model, train, val, out, resume_state, log, tracker)
                elif d.main:
                    train_baseline(args, model, train, val, out, tracker)
                    with atomic_output(out / STATE) as tmp:
                        torch.save({"epoch": args.epochs}, tmp)
        except BaseException:
            if created and d.main and not (out / STATE).exists():
                shutil.rmtree(out, ignore_errors=True)  # nothing usable was written: leave no half-made run
            raise
        done = args.method not in EPOCH_METHODS or args.stop_after is None or \
            (resume_state["epoch"] if resume_state else 0) + args.stop_after >= args.epochs
        if d.main and done:
            calibrate_checkpoints(args, out, val, shots, d.device)
        d.barrier()
    finally:
        d.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m nearl_rt.train"))
