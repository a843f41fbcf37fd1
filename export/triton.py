"""`python -m export.triton MODEL.onnx|CKPT --repo DIR`: a Triton Inference Server model repository.

    DIR/<name>/config.pbtxt      onnxruntime backend, dynamic batching, instance group, warm-up
    DIR/<name>/labels.txt        class names, one per line (Triton does not expose ONNX metadata_props)
    DIR/<name>/<version>/model.onnx

The repository is assembled beside DIR/<name> and renamed into place, so a half-written model never
appears; an existing version is replaced only with --force. Before it reports success the written
config.pbtxt is parsed with Triton's own protobuf schema (tritonclient's model_config_pb2: misspelt
fields, bad enums and brace errors fail with line:column) and checked against the ONNX graph (names,
dtypes, dims without the batch axis, one output per class, batch settings). `--check DIR/<name>` runs
the same checks on a repository edited by hand.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from export.runtime import METADATA_PREFIX, decode_metadata
from nearl_rt.errors import NearlError

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
INPUT, OUTPUTS = "images", ("logits", "probs")
# ONNX TensorProto element type -> Triton data type (the ones an exported classifier can have).
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 2: "TYPE_UINT8", 7: "TYPE_INT64", 6: "TYPE_INT32",
                   9: "TYPE_BOOL", 11: "TYPE_FP64"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class RepositoryError(NearlError):
    """A model repository cannot be written, or its config does not fit the model."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str          # Triton name, e.g. TYPE_FP32
    shape: tuple            # full ONNX shape, -1 for a symbolic dim


@dataclass(frozen=True)
class Signature:
    """What a config.pbtxt must agree with: the ONNX graph's tensors and the nearl.* metadata."""
    inputs: tuple
    outputs: tuple
    class_names: tuple
    metadata: dict

    @property
    def dynamic_batch(self) -> bool:
        return all(t.shape and t.shape[0] == -1 for t in self.inputs + self.outputs)


@dataclass(frozen=True)
class Options:
    name: str = "nearl_clip"
    version: int = 1
    max_batch_size: int = 64
    instances: int = 1
    gpu: bool = True
    tensorrt_fp16: bool = False
    max_queue_delay_us: int = 2000


def model_config_pb2():
    """Triton's ModelConfig protobuf module, loaded from the tritonclient wheel's file: importing
    `tritonclient.grpc` would pull in grpcio, which only the schema's users of gRPC need."""
    spec = importlib.util.find_spec("tritonclient")
    path = Path(spec.submodule_search_locations[0], "grpc", "model_config_pb2.py") if spec else None
    if path is None or not path.is_file():
        raise RepositoryError("Triton's config schema needs the tritonclient package: pip install 'nearl-rt[triton]'")
    module_spec = importlib.util.spec_from_file_location("nearl_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def read_signature(onnx_path) -> Signature:
    """The graph inputs/outputs (initializers excluded) and nearl.* metadata of an exported model."""
    import onnx
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...
        raise RepositoryError(f"cannot read {onnx_path} as ONNX: {str(e).splitlines()[0] if str(e) else e}") from None
    meta = decode_metadata({p.key[len(METADATA_PREFIX):]: p.value for p in proto.metadata_props
                            if p.key.startswith(METADATA_PREFIX)})
    if "class_names" not in meta or "input_size" not in meta:
        raise RepositoryError(f"{onnx_path} lacks the nearl.* metadata: it was not written by `python -m export.onnx`")
    initializers = {i.name for i in proto.graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        if t.elem_type not in _ONNX_TO_TRITON:
            raise RepositoryError(f"{onnx_path}: tensor {v.name!r} has ONNX element type {t.elem_type}, "
                                  f"which Triton's onnxruntime backend does not map")
        return TensorSpec(v.name, _ONNX_TO_TRITON[t.elem_type],
                          tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim))

    return Signature(tuple(spec(v) for v in proto.graph.input if v.name not in initializers),
                     tuple(spec(v) for v in proto.graph.output), tuple(meta["class_names"]), meta)


def build_config(sig: Signature, opts: Options):
    """The classifier's ModelConfig message (see the module docstring for what each part does)."""
    pb = model_config_pb2()
    if not sig.dynamic_batch:
        raise RepositoryError("the model has a fixed batch size: Triton then needs max_batch_size 0 and loses dynamic "
                              "batching; re-export with `python -m export.onnx CKPT --batch-size dynamic`")
    c = pb.ModelConfig(name=opts.name, backend="onnxruntime", max_batch_size=opts.max_batch_size)
    for t in sig.inputs:
        c.input.add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=t.shape[1:])
    for t in sig.outputs:
        out = c.output.add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=t.shape[1:])
        if t.name == "probs":
            out.label_filename = LABELS_FILE  # enables Triton's classification extension (top-k labels)
    # No preferred_batch_size: Triton's batcher guide advises leaving it unset unless some sizes are much faster.
    c.dynamic_batching.max_queue_delay_microseconds = opts.max_queue_delay_us
    c.instance_group.add(count=opts.instances,
                         kind=pb.ModelInstanceGroup.KIND_GPU if opts.gpu else pb.ModelInstanceGroup.KIND_CPU)
    if opts.tensorrt_fp16:
        _add_tensorrt_fp16(c, sig, opts.max_batch_size)
    # Triton marks the model ready only after the warm-up ran: batch 1 and the largest batch, so the first
    # requests pay no allocation (or, with TensorRT, engine build) cost.
    for batch in sorted({1, opts.max_batch_size}):
        warm = c.model_warmup.add(name=f"random_batch{batch}", batch_size=batch)
        for t in sig.inputs:
            warm.inputs[t.name].CopyFrom(pb.ModelWarmup.Input(data_type=pb.DataType.Value(t.data_type),
                                                             dims=t.shape[1:], random_data=True))
    return c


def _add_tensorrt_fp16(config, sig: Signature, max_batch: int) -> None:
    """onnxruntime's TensorRT execution provider in FP16, with an engine profile for the whole batch range
    (min/opt/max must be given together) so that batches do not trigger engine rebuilds."""
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    dims = {t.name: "x".join(str(d) for d in t.shape[1:]) for t in sig.inputs}
    profile = {"min": 1, "opt": max_batch, "max": max_batch}
    params = {"precision_mode": "FP16", "max_workspace_size_bytes": str(4 << 30), "trt_engine_cache_enable": "1"}
    for kind, batch in profile.items():
        params[f"trt_profile_{kind}_shapes"] = ",".join(f"{n}:{batch}x{d}" for n, d in dims.items())
    for key, value in params.items():
        accel.parameters[key] = value


def config_text(config, source: str) -> str:
    from google.protobuf import text_format
    return (f"# Written by `python -m export.triton` from {source}. After editing, check it with\n"
            f"# `python -m export.triton --check <repo>/{config.name}`.\n" + text_format.MessageToString(config))


def parse_config(path):
    """config.pbtxt -> ModelConfig; RepositoryError with the file's line:column on a syntax/schema error."""
    from google.protobuf import text_format
    try:
        return text_format.Parse(Path(path).read_text(), model_config_pb2().ModelConfig())
    except text_format.ParseError as e:
        raise RepositoryError(f"{path}:{e}") from None


def config_problems(config, sig: Signature, labels: Optional[list], dir_name: str) -> list:
    """What in `config` does not fit the ONNX signature (empty list = consistent)."""
    pb = model_config_pb2()
    dtype = pb.DataType.Name
    problems = []
    if config.name and config.name != dir_name:
        problems.append(f"name {config.name!r} differs from the directory name {dir_name!r}")
    if config.backend != "onnxruntime" and config.platform != "onnxruntime_onnx":
        problems.append(f"backend {config.backend or config.platform!r}: expected \"onnxruntime\"")
    if sig.dynamic_batch != (config.max_batch_size > 0):
        problems.append(f"max_batch_size {config.max_batch_size} does not fit a "
                        f"{'dynamic' if sig.dynamic_batch else 'fixed'}-batch model (dynamic needs > 0, fixed 0)")
    if config.max_batch_size == 0 and config.HasField("dynamic_batching"):
        problems.append("dynamic_batching needs max_batch_size > 0")
    bad_pref = [p for p in config.dynamic_batching.preferred_batch_size if not 0 < p <= config.max_batch_size]
    if bad_pref:
        problems.append(f"preferred_batch_size {bad_pref} outside 1..max_batch_size {config.max_batch_size}")
    skip = 1 if config.max_batch_size > 0 else 0
    for kind, want, got in (("input", sig.inputs, config.input), ("output", sig.outputs, config.output)):
        have = {t.name: t for t in got}
        for t in want:
            if t.name not in have:
                problems.append(f"{kind} {t.name!r} of the model is missing")
                continue
            c = have.pop(t.name)
            if dtype(c.data_type) != t.data_type:
                problems.append(f"{kind} {t.name!r}: data_type {dtype(c.data_type)}, the model has {t.data_type}")
            if tuple(c.dims) != t.shape[skip:]:
                problems.append(f"{kind} {t.name!r}: dims {list(c.dims)}, the model has {list(t.shape[skip:])}"
                                + (" (without the batch axis)" if skip else ""))
        problems += [f"{kind} {n!r} is not in the model" for n in have]
    n = len(sig.class_names)
    for t in config.output:
        if t.name in OUTPUTS and tuple(t.dims) != (n,):
            problems.append(f"output {t.name!r}: dims {list(t.dims)}, the model has {n} classes")
        if t.label_filename:
            if labels is None:
                problems.append(f"output {t.name!r}: label_filename {t.label_filename!r} does not exist")
            elif labels != list(sig.class_names):
                problems.append(f"{t.label_filename}: {len(labels)} lines differ from the model's {n} class names")
    inputs = {t.name: t for t in sig.inputs}
    for w in config.model_warmup:
        if config.max_batch_size and not 0 < w.batch_size <= config.max_batch_size:
            problems.append(f"model_warmup {w.name!r}: batch_size {w.batch_size} outside 1..{config.max_batch_size}")
        for name, value in w.inputs.items():
            t = inputs.get(name)
            if t is None or dtype(value.data_type) != t.data_type or tuple(value.dims) != t.shape[skip:]:
                problems.append(f"model_warmup {w.name!r}: input {name!r} does not match the model's inputs")
    for group in config.instance_group:
        if group.count < 1:
            problems.append(f"instance_group count {group.count} must be >= 1")
    return problems


def check_model_dir(model_dir) -> Path:
    """Parse and check DIR/<name>/config.pbtxt against its newest version's model.onnx; returns that file."""
    model_dir = Path(model_dir)
    config = parse_config(model_dir / CONFIG_FILE)
    versions = sorted((int(p.name), p) for p in model_dir.iterdir()
                      if p.is_dir() and p.name.isdigit() and not p.name.startswith("0"))
    if not versions:
        raise RepositoryError(f"{model_dir} has no numeric version directory (e.g. {model_dir}/1/{MODEL_FILE})")
    onnx_path = versions[-1][1] / (config.default_model_filename or MODEL_FILE)
    labels_path = model_dir / LABELS_FILE
    labels = labels_path.read_text(encoding="utf-8").splitlines() if labels_path.is_file() else None
    problems = config_problems(config, read_signature(onnx_path), labels, model_dir.name)
    if problems:
        raise RepositoryError(f"{model_dir / CONFIG_FILE} does not fit {onnx_path}: " + "; ".join(problems))
    return onnx_path


def _check_options(opts: Options) -> None:
    if not _NAME.match(opts.name):
        raise RepositoryError(f"--name {opts.name!r}: use letters, digits, '_', '.', '-' (a directory name)")
    if opts.version < 1:
        raise RepositoryError(f"--version {opts.version}: Triton versions are integers >= 1")
    if opts.max_batch_size < 1:
        raise RepositoryError(f"--max-batch-size {opts.max_batch_size}: must be >= 1 for dynamic batching")
    if opts.instances < 1:
        raise RepositoryError(f"--instances {opts.instances}: must be >= 1")
    if opts.max_queue_delay_us < 0:
        raise RepositoryError(f"--max-queue-delay-us {opts.max_queue_delay_us}: must be >= 0")
    if opts.tensorrt_fp16 and not opts.gpu:
        raise RepositoryError("--tensorrt-fp16 needs --gpu (TensorRT runs on GPUs only)")


def write_repository(model, repo, opts: Options = Options(), *, force: bool = False,
                     pretrained: Optional[str] = None) -> Path:
    """Write (or add a version to) REPO/<name> from an exported .onnx or a checkpoint; returns the model dir.

    The new version directory, config.pbtxt and labels.txt are written and checked in a temporary
    directory inside REPO, then moved into place: config and labels first (each an atomic rename),
    the version directory last, so a polling server never sees a new model beside an old config.
    """
    _check_options(opts)
    model, repo = Path(model), Path(repo)
    if not model.is_file():
        raise RepositoryError(f"model not found: {model} (give an exported .onnx or a nearl-rt checkpoint)")
    repo.mkdir(parents=True, exist_ok=True)
    model_dir = repo / opts.name
    version_dir = model_dir / str(opts.version)
    if version_dir.exists() and not force:
        raise RepositoryError(f"{version_dir} exists: choose another --version, or pass --force to replace it")
    staging = Path(tempfile.mkdtemp(prefix=f".{opts.name}.", suffix=".tmp", dir=repo))
    try:
        staged = staging / opts.name  # Triton's check wants the directory named like the model
        onnx_path = staged / str(opts.version) / MODEL_FILE
        onnx_path.parent.mkdir(parents=True)
        if model.suffix == ".onnx":
            shutil.copyfile(model, onnx_path)
        else:
            _export_checkpoint(model, onnx_path, pretrained)
        sig = read_signature(onnx_path)
        bad = [c for c in sig.class_names if not c or "\n" in c or "\r" in c]
        if bad:
            raise RepositoryError(f"class names {bad!r} cannot be lines of {LABELS_FILE} (empty or with line breaks)")
        (staged / CONFIG_FILE).write_text(config_text(build_config(sig, opts), model.name))
        (staged / LABELS_FILE).write_text("".join(f"{c}\n" for c in sig.class_names), encoding="utf-8")
        check_model_dir(staged)
        _move_into_place(staged, model_dir, str(opts.version))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def _move_into_place(staged: Path, model_dir: Path, version: str) -> None:
    if not model_dir.exists():
        staged.rename(model_dir)
        return
    for item in (CONFIG_FILE, LABELS_FILE):
        os.replace(staged / item, model_dir / item)
    old = model_dir / version
    if old.exists():
        old.rename(staged / f"old-{version}")  # removed with the staging directory
    (staged / version).rename(old)


def _export_checkpoint(ckpt: Path, out: Path, pretrained: Optional[str]) -> None:
    from export.onnx import export_model, load_exportable
    from nearl_rt.backbone import sha256_file
    export_model(load_exportable(ckpt, pretrained), out, checkpoint_sha256=sha256_file(ckpt))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.triton", description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="an exported MODEL.onnx (dynamic batch) or a nearl-rt checkpoint")
    parser.add_argument("--repo", help="the model repository directory (created if missing)")
    parser.add_argument("--check", metavar="MODEL_DIR", help="only check REPO/<name> (config.pbtxt vs model.onnx)")
    parser.add_argument("--name", default=Options.name, help="model name = directory (default %(default)s)")
    parser.add_argument("--version", type=int, default=Options.version, help="version directory (default 1)")
    parser.add_argument("--max-batch-size", type=int, default=Options.max_batch_size, help="default %(default)s")
    parser.add_argument("--instances", type=int, default=Options.instances,
                        help="model instances per device (default %(default)s)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--gpu", dest="gpu", action="store_true", default=True, help="KIND_GPU instances (default)")
    kind.add_argument("--cpu", dest="gpu", action="store_false", help="KIND_CPU instances")
    parser.add_argument("--tensorrt-fp16", action="store_true",
                        help="run through onnxruntime's TensorRT provider in FP16 (check accuracy on your data)")
    parser.add_argument("--max-queue-delay-us", type=int, default=Options.max_queue_delay_us,
                        help="how long the dynamic batcher waits for more requests (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    parser.add_argument("--pretrained", help="the backbone weights file, when exporting a checkpoint whose file moved")
    args = parser.parse_args(argv)
    if args.check:
        onnx_path = check_model_dir(args.check)
        print(f"{args.check}: config.pbtxt fits {onnx_path}")
        return 0
    if not args.model or not args.repo:
        parser.error("give MODEL and --repo DIR (or --check MODEL_DIR)")
    opts = Options(args.name, args.version, args.max_batch_size, args.instances, args.gpu, args.tensorrt_fp16,
                   args.max_queue_delay_us)
    model_dir = write_repository(args.model, args.repo, opts, force=args.force, pretrained=args.pretrained)
    print(f"wrote {model_dir}/{opts.version}/{MODEL_FILE} with {CONFIG_FILE} and {LABELS_FILE} (checked); "
          f"serve it with: docker run --rm -p8000:8000 -p8001:8001 -v {Path(args.repo).resolve()}:/models "
          f"nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models")
    return 0


if __name__ == "__main__":
    from nearl_rt.cli import run_cli
    sys.exit(run_cli(main, prog="python -m export.triton"))
