"""`python -m export.triton MODEL.onnx|CKPT --repo DIR`: a Triton Inference Server model repository.

    DIR/<name>/config.pbtxt      onnxruntime backend, dynamic batching, instance group, warm-up
    DIR/<name>/labels.txt        class names, one per line (Triton does not expose ONNX metadata_props)
    DIR/<name>/<version>/model.onnx

`--backend openvino` configures the same model.onnx for Triton's OpenVINO backend (CPU instances). That backend
(github.com/triton-inference-server/openvino_backend, src/openvino.cc, read at db19304, 2026-08) takes five
OpenVINO properties from config.pbtxt (INFERENCE_NUM_THREADS, COMPILATION_NUM_THREADS, HINT_BF16 = YES only,
NUM_STREAMS, PERFORMANCE_HINT): it cannot hold OpenVINO to f32, and OpenVINO infers in bf16 by default on CPUs with
AVX512-BF16 or AMX. So the file must record that OpenVINO bf16 passed the int8 gates (`export.onnx
--openvino-bf16`): it then serves f32 on CPUs without native bf16 and the verified bf16 on those with it (no
HINT_BF16: forced on a CPU without native bf16 it is emulated, ~30x slower). The backend also fixes the batch at
max_batch_size and pads smaller batches to it (ENABLE_BATCH_PADDING): keep max_batch_size small (default 8).

The repository is assembled beside DIR/<name> and renamed into place, so a half-written model never
appears; an existing version is replaced only with --force. Before it reports success the written
config.pbtxt is parsed with Triton's own protobuf schema (tritonclient's model_config_pb2: misspelt
fields, bad enums and brace errors fail with line:column) and checked against the ONNX graph (names,
dtypes, dims without the batch axis, one output per class, batch settings). `--check DIR/<name>` runs
the same checks on a repository edited by hand.

`--with-preprocess` adds the server-side preprocessing as a Triton ensemble (all onnxruntime, GPU or CPU):

    DIR/<name>_preprocess/    export.preprocess_graph's graph: image UINT8 [1, H, W, C] (any H, W; C = 3 or 1)
                              -> images FP32 [1, 3, S, S], what NearlSession.preprocess computes
    DIR/<name>_image/         ensemble: image -> <name>_preprocess -> <name> (its dynamic batcher) -> logits, probs
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

from nearl_rt.core.metadata import PREPROCESS_KIND, preprocess_graph_path, read_metadata, verified_precision
from nearl_rt.core.errors import NearlError

MODEL_FILE = "model.onnx"
BACKENDS = ("onnxruntime", "openvino")
OPENVINO_NEEDS_BF16 = ("the model records no verification of OpenVINO bf16, which Triton's OpenVINO backend runs on "
                       "CPUs with AVX512-BF16/AMX (it cannot be held to f32): export with `python -m export.onnx CKPT "
                       "--openvino-bf16 [--verify-data DATA]` first, or serve f32 with the onnxruntime backend or "
                       "`python -m export.serve MODEL --runtime openvino`")
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
    with_preprocess: bool = False
    backend: str = "onnxruntime"

    @property
    def preprocess_name(self) -> str:
        return f"{self.name}_preprocess"

    @property
    def ensemble_name(self) -> str:
        return f"{self.name}_image"


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
    meta = read_metadata(proto)
    if "input_size" not in meta or ("class_names" not in meta and meta.get("kind") != PREPROCESS_KIND):
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
                     tuple(spec(v) for v in proto.graph.output), tuple(meta.get("class_names", ())), meta)


def _onnx_config(pb, name: str, sig: Signature, opts: Options, max_batch_size: int, backend: str = "onnxruntime"):
    """A ModelConfig of `backend` with the graph's tensors (dims without the batch axis when batching)."""
    c = pb.ModelConfig(name=name, backend=backend, max_batch_size=max_batch_size)
    skip = 1 if max_batch_size else 0
    for t in sig.inputs:
        c.input.add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=t.shape[skip:])
    for t in sig.outputs:
        out = c.output.add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=t.shape[skip:])
        if t.name == "probs":
            out.label_filename = LABELS_FILE  # enables Triton's classification extension (top-k labels)
    c.instance_group.add(count=opts.instances,
                         kind=pb.ModelInstanceGroup.KIND_GPU if opts.gpu else pb.ModelInstanceGroup.KIND_CPU)
    return c


def build_config(sig: Signature, opts: Options):
    """The classifier's ModelConfig message (see the module docstring for what each part does)."""
    pb = model_config_pb2()
    if not sig.dynamic_batch:
        raise RepositoryError("the model has a fixed batch size: Triton then needs max_batch_size 0 and loses dynamic "
                              "batching; re-export with `python -m export.onnx CKPT --batch-size dynamic`")
    c = _onnx_config(pb, opts.name, sig, opts, opts.max_batch_size, opts.backend)
    # No preferred_batch_size: Triton's batcher guide advises leaving it unset unless some sizes are much faster.
    c.dynamic_batching.max_queue_delay_microseconds = opts.max_queue_delay_us
    if opts.tensorrt_fp16:
        _add_tensorrt_fp16(c, sig, opts.max_batch_size)
    if opts.backend == "openvino":
        c.default_model_filename = MODEL_FILE  # the backend's default is model.xml (OpenVINO IR)
        # The backend fixes the model's batch at max_batch_size: smaller batches are padded to it (else refused).
        c.parameters["ENABLE_BATCH_PADDING"].string_value = "YES"
        c.parameters["NUM_STREAMS"].string_value = "1"
        c.parameters["PERFORMANCE_HINT"].string_value = "LATENCY"
    # Triton marks the model ready only after the warm-up ran: batch 1 and the largest batch, so the first
    # requests pay no allocation (or, with TensorRT, engine build) cost.
    for batch in sorted({1, opts.max_batch_size}):
        warm = c.model_warmup.add(name=f"random_batch{batch}", batch_size=batch)
        for t in sig.inputs:
            warm.inputs[t.name].CopyFrom(pb.ModelWarmup.Input(data_type=pb.DataType.Value(t.data_type),
                                                             dims=t.shape[1:], random_data=True))
    return c


def build_preprocess_config(sig: Signature, opts: Options):
    """The preprocessing graph's ModelConfig: one image of any size per request, so no batching of its own
    (the classifier behind it batches)."""
    return _onnx_config(model_config_pb2(), opts.preprocess_name, sig, opts, 0)


def build_ensemble_config(pre: Signature, classifier: Signature, opts: Options):
    """image -> <name>_preprocess -> <name> -> logits, probs, pinned to the same version of both."""
    pb = model_config_pb2()
    c = pb.ModelConfig(name=opts.ensemble_name, platform="ensemble", max_batch_size=0)
    (image,) = pre.inputs
    c.input.add(name=image.name, data_type=pb.DataType.Value(image.data_type), dims=image.shape)
    for t in classifier.outputs:  # [1, C]: the one preprocessed image as a batch of 1
        c.output.add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=(1, *t.shape[1:]))
    (pre_out,) = pre.outputs
    step = c.ensemble_scheduling.step.add(model_name=opts.preprocess_name, model_version=opts.version)
    step.input_map[image.name] = image.name
    step.output_map[pre_out.name] = "preprocessed"
    step = c.ensemble_scheduling.step.add(model_name=opts.name, model_version=opts.version)
    step.input_map[INPUT] = "preprocessed"
    for t in classifier.outputs:
        step.output_map[t.name] = t.name
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
    if config.backend == "openvino":
        problems += _openvino_problems(config, sig)
    elif config.backend != "onnxruntime" and config.platform != "onnxruntime_onnx":
        problems.append(f"backend {config.backend or config.platform!r}: expected \"onnxruntime\" or \"openvino\"")
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


def _openvino_problems(config, sig: Signature) -> list:
    pb = model_config_pb2()
    problems = []
    if not verified_precision(sig.metadata, "openvino", "bf16"):
        problems.append(OPENVINO_NEEDS_BF16)
    parameters = {k: v.string_value.upper() for k, v in config.parameters.items()}
    if config.max_batch_size and parameters.get("ENABLE_BATCH_PADDING") != "YES":
        problems.append("parameters: ENABLE_BATCH_PADDING must be YES (Triton's OpenVINO backend fixes the batch "
                        "at max_batch_size and refuses smaller requests without it)")
    if any(g.kind == pb.ModelInstanceGroup.KIND_GPU for g in config.instance_group):
        problems.append("instance_group: KIND_GPU, but Triton's OpenVINO backend runs on CPU only (KIND_CPU)")
    if "HINT_BF16" in parameters:
        problems.append("parameters: HINT_BF16 forces bf16 also on CPUs without native bf16, where OpenVINO emulates "
                        "it ~30x slower: leave it out (OpenVINO picks bf16 where the CPU has it)")
    return problems


def _compatible(a, b) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def ensemble_problems(config, repo: Path) -> list:
    """What in an ensemble's steps does not fit the models it names in `repo` (names, versions, data types,
    shapes: a batching model's tensors have a batch axis of any size in front of their dims)."""
    pb = model_config_pb2()
    tensors = {t.name: (t.data_type, tuple(t.dims)) for t in config.input}
    problems = []
    for step in config.ensemble_scheduling.step:
        where = f"step {step.model_name!r}"
        model_dir = repo / step.model_name
        if not (model_dir / CONFIG_FILE).is_file():
            problems.append(f"{where}: no model {model_dir}")
            continue
        if step.model_version > 0 and not (model_dir / str(step.model_version)).is_dir():
            problems.append(f"{where}: version {step.model_version} does not exist in {model_dir}")
        model = parse_config(model_dir / CONFIG_FILE)
        batch = (-1,) if model.max_batch_size else ()
        inputs = {t.name: (t.data_type, batch + tuple(t.dims)) for t in model.input}
        outputs = {t.name: (t.data_type, batch + tuple(t.dims)) for t in model.output}
        for model_input, tensor in step.input_map.items():
            if tensor not in tensors:
                problems.append(f"{where}: input {tensor!r} is neither an ensemble input nor an earlier step's output")
            elif model_input not in inputs:
                problems.append(f"{where}: the model has no input {model_input!r}")
            elif tensors[tensor][0] != inputs[model_input][0] or not _compatible(tensors[tensor][1],
                                                                                 inputs[model_input][1]):
                problems.append(f"{where}: {tensor!r} {pb.DataType.Name(tensors[tensor][0])}{list(tensors[tensor][1])} "
                                f"does not fit input {model_input!r} {pb.DataType.Name(inputs[model_input][0])}"
                                f"{list(inputs[model_input][1])}")
        missing = [n for n in inputs if n not in step.input_map]
        if missing:
            problems.append(f"{where}: inputs {missing} are not mapped")
        for model_output, tensor in step.output_map.items():
            if model_output not in outputs:
                problems.append(f"{where}: the model has no output {model_output!r}")
            else:
                tensors[tensor] = outputs[model_output]
    for t in config.output:
        got = tensors.get(t.name)
        if got is None:
            problems.append(f"output {t.name!r} is produced by no step")
        elif got[0] != t.data_type or not _compatible(got[1], tuple(t.dims)):
            problems.append(f"output {t.name!r}: {pb.DataType.Name(t.data_type)}{list(t.dims)}, the step produces "
                            f"{pb.DataType.Name(got[0])}{list(got[1])}")
    return problems


def check_model_dir(model_dir) -> Path:
    """Parse and check DIR/<name>/config.pbtxt against its newest version's model.onnx (an ensemble: against
    the models of its steps, each checked too); returns that file (an ensemble: its directory)."""
    model_dir = Path(model_dir)
    config = parse_config(model_dir / CONFIG_FILE)
    if config.platform == "ensemble":
        problems = ensemble_problems(config, model_dir.parent)
        if not any(p.is_dir() and p.name.isdigit() for p in model_dir.iterdir()):
            problems.append("no numeric version directory (an ensemble's is empty: mkdir 1)")
        if config.name and config.name != model_dir.name:
            problems.insert(0, f"name {config.name!r} differs from the directory name {model_dir.name!r}")
        if problems:
            raise RepositoryError(f"{model_dir / CONFIG_FILE}: " + "; ".join(problems))
        for step in config.ensemble_scheduling.step:
            check_model_dir(model_dir.parent / step.model_name)
        return model_dir
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
    if opts.backend not in BACKENDS:
        raise RepositoryError(f"--backend {opts.backend!r}: use one of {', '.join(BACKENDS)}")
    if opts.backend == "openvino" and opts.gpu:
        raise RepositoryError("--backend openvino: Triton's OpenVINO backend runs on CPU instances only (--cpu; "
                              "gpu=False)")
    if opts.backend == "openvino" and opts.with_preprocess:
        raise RepositoryError("--with-preprocess is written for the onnxruntime backend only: leave it out with "
                              "--backend openvino (NearlSession.preprocess or the C++ library preprocess on the client)")


def write_repository(model, repo, opts: Options = Options(), *, force: bool = False,
                     pretrained: Optional[str] = None) -> Path:
    """Write (or add a version to) REPO/<name> from an exported .onnx or a checkpoint, with
    opts.with_preprocess also REPO/<name>_preprocess and the ensemble REPO/<name>_image; returns REPO/<name>.

    Everything is written and checked in a temporary directory inside REPO, then moved into place
    model by model (the ensemble last): config and labels first (each an atomic rename), the version
    directory last, so a polling server never sees a new model beside an old config.
    """
    _check_options(opts)
    model, repo = Path(model), Path(repo)
    if not model.exists():
        raise RepositoryError(f"model not found: {model} (give an exported .onnx, a nearl-rt checkpoint or a "
                              f"save-pretrained folder)")
    if repo.exists() and not repo.is_dir():
        raise RepositoryError(f"--repo {repo} is a file; give a directory (it is created if missing)")
    if model.suffix == ".onnx":
        read_signature(model)  # another tool's file is refused here, by its own name, before anything is written
    names = [opts.name] + ([opts.preprocess_name, opts.ensemble_name] if opts.with_preprocess else [])
    for name in names:
        version_dir = repo / name / str(opts.version)
        if version_dir.exists() and not force:
            raise RepositoryError(f"{version_dir} exists: choose another --version, or pass --force to replace it")
    created = [d for d in (repo, *repo.parents) if not d.exists()]  # removed again if this fails
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{opts.name}.", suffix=".tmp", dir=repo))
    try:
        # Triton's checks want each directory named like its model.
        onnx_path = _staged_version(staging, opts.name, opts)
        if model.suffix == ".onnx":
            shutil.copyfile(model, onnx_path)
        else:
            _export_checkpoint(model, onnx_path, pretrained)
        sig = read_signature(onnx_path)
        if opts.backend == "openvino" and not verified_precision(sig.metadata, "openvino", "bf16"):
            raise RepositoryError(f"--backend openvino: {OPENVINO_NEEDS_BF16}")
        bad = [c for c in sig.class_names if not c or "\n" in c or "\r" in c]
        if bad:
            raise RepositoryError(f"class names {bad!r} cannot be lines of {LABELS_FILE} (empty or with line breaks)")
        _write_config(staging / opts.name, build_config(sig, opts), model.name)
        (staging / opts.name / LABELS_FILE).write_text("".join(f"{c}\n" for c in sig.class_names), encoding="utf-8")
        if opts.with_preprocess:
            given = preprocess_graph_path(model) if model.suffix == ".onnx" else None
            _stage_preprocess(staging, onnx_path, given if given and given.is_file() else None, sig, opts, model.name)
        for name in names:
            check_model_dir(staging / name)
        for name in names:
            _move_into_place(staging / name, repo / name, str(opts.version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:  # a failed run leaves nothing: not even the directories it made
            shutil.rmtree(created[-1], ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return repo / opts.name


def _staged_version(staging: Path, name: str, opts: Options) -> Path:
    path = staging / name / str(opts.version) / MODEL_FILE
    path.parent.mkdir(parents=True)
    return path


def _write_config(model_dir: Path, config, source: str) -> None:
    (model_dir / CONFIG_FILE).write_text(config_text(config, source))


def _stage_preprocess(staging: Path, classifier: Path, given: Optional[Path], sig: Signature, opts: Options,
                      source: str) -> None:
    """<name>_preprocess and the ensemble. The graph is MODEL.preprocess.onnx when the export wrote one
    (`python -m export.onnx CKPT --preprocess`, verified then) and it belongs to this classifier; else
    it is written and verified now."""
    from nearl_rt.core.hashing import sha256_file
    from nearl_rt.export.preprocess_graph import PreprocessGraphError, export_preprocess_graph, read_preprocess_metadata
    pre_path = _staged_version(staging, opts.preprocess_name, opts)
    try:
        if given is None:
            export_preprocess_graph(classifier, pre_path)
        elif read_preprocess_metadata(given).get("classifier_sha256") != sha256_file(classifier):
            raise RepositoryError(f"{given} was written for another classifier (nearl.classifier_sha256); rewrite it "
                                  f"with `python -m export.preprocess_graph {given.with_suffix('').with_suffix('')}"
                                  f".onnx` or delete it")
        else:
            shutil.copyfile(given, pre_path)
    except PreprocessGraphError as e:
        raise RepositoryError(f"--with-preprocess: {e}") from None
    pre = read_signature(pre_path)
    _write_config(staging / opts.preprocess_name, build_preprocess_config(pre, opts),
                  f"the preprocessing graph of {source}")
    _staged_version(staging, opts.ensemble_name, opts)  # an ensemble's version directory stays empty
    _write_config(staging / opts.ensemble_name, build_ensemble_config(pre, sig, opts), source)


def _move_into_place(staged: Path, model_dir: Path, version: str) -> None:
    if not model_dir.exists():
        staged.rename(model_dir)
        return
    for item in staged.iterdir():
        if item.is_file():
            os.replace(item, model_dir / item.name)
    old = model_dir / version
    if old.exists():
        old.rename(staged / f"old-{version}")  # removed with the staging directory
    (staged / version).rename(old)


def _export_checkpoint(ckpt: Path, out: Path, pretrained: Optional[str]) -> None:
    from nearl_rt.export.onnx import export_checkpoint
    export_checkpoint(ckpt, out, pretrained=pretrained)


def docker_command(repo: Path, gpu: bool) -> str:
    """The `docker run` line that serves `repo` with the NGC tritonserver image (GPUs only for KIND_GPU models)."""
    return (f"docker run --rm{' --gpus all' if gpu else ''} -p8000:8000 -p8001:8001 -v {repo.resolve()}:/models "
            f"nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.triton", description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="an exported MODEL.onnx (dynamic batch) or a nearl-rt checkpoint")
    parser.add_argument("--repo", help="the model repository directory (created if missing)")
    parser.add_argument("--check", metavar="MODEL_DIR", help="only check REPO/<name> (config.pbtxt vs model.onnx)")
    parser.add_argument("--name", default=Options.name, help="model name = directory (default %(default)s)")
    parser.add_argument("--version", type=int, default=Options.version, help="version directory (default 1)")
    parser.add_argument("--max-batch-size", type=int,
                        help="largest batch (default 64; 8 with --backend openvino, which pads every batch to it)")
    parser.add_argument("--instances", type=int, default=Options.instances,
                        help="model instances per device (default %(default)s)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                      help="KIND_GPU instances (default, except with --backend openvino)")
    kind.add_argument("--cpu", dest="gpu", action="store_false", help="KIND_CPU instances")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="Triton backend: onnxruntime (default) or openvino (CPU instances; for a file exported "
                             "with --openvino-bf16, since that backend runs bf16 where the CPU has it)")
    parser.add_argument("--tensorrt-fp16", action="store_true",
                        help="run through onnxruntime's TensorRT provider in FP16 (check accuracy on your data)")
    parser.add_argument("--max-queue-delay-us", type=int, default=Options.max_queue_delay_us,
                        help="how long the dynamic batcher waits for more requests (default %(default)s)")
    parser.add_argument("--with-preprocess", action="store_true",
                        help="add <name>_preprocess (the preprocessing graph) and the ensemble <name>_image: "
                             "uint8 images of any size in, logits/probs out")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    parser.add_argument("--pretrained", help="the backbone weights file, when exporting a checkpoint whose file moved")
    args = parser.parse_args(argv)
    if args.check:
        onnx_path = check_model_dir(args.check)
        print(f"{args.check}: config.pbtxt fits {onnx_path}")
        return 0
    if not args.model or not args.repo:
        parser.error("give MODEL and --repo DIR (or --check MODEL_DIR)")
    openvino = args.backend == "openvino"
    max_batch = args.max_batch_size if args.max_batch_size is not None else 8 if openvino else Options.max_batch_size
    opts = Options(args.name, args.version, max_batch,
                   args.instances, (not openvino) if args.gpu is None else args.gpu, args.tensorrt_fp16,
                   args.max_queue_delay_us, args.with_preprocess, args.backend)
    model_dir = write_repository(args.model, args.repo, opts, force=args.force, pretrained=args.pretrained)
    extra = f", {opts.preprocess_name} and the ensemble {opts.ensemble_name}" if opts.with_preprocess else ""
    print(f"wrote {model_dir}/{opts.version}/{MODEL_FILE} with {CONFIG_FILE} and {LABELS_FILE}{extra} (checked); "
          f"serve it with: {docker_command(Path(args.repo), opts.gpu)}")
    return 0


if __name__ == "__main__":
    from nearl_rt.core.cli import run_cli
    sys.exit(run_cli(main, prog="python -m export.triton"))
