"""`python -m export.serve MODEL.onnx`: serve an exported model through Triton Inference Server on one machine.

The server is the tritonserver binary bundled with PyPI's nvidia-pytriton; the model runs in this
package's NearlSession (onnxruntime, CUDA when available; `--runtime openvino`: OpenVINO's CPU plugin, f32 or,
for a file verified under it, `--precision bf16`) behind Triton's dynamic batcher. Clients speak
the KServe v2 protocol over HTTP and gRPC (tritonclient works), with two models:

    <name>        images   FP32 [batch, 3, H, W] (preprocessed)  -> logits, probs FP32 [batch, C]
    <name>_image  image_bytes BYTES [n] (encoded PNG/JPEG/...)   -> logits, probs FP32 [n, C]

`<name>_image` decodes and preprocesses each request exactly as NearlSession.predict does, then sends
the batch to `<name>` over loopback gRPC, so image and tensor requests share one batcher (and a bad
image fails only its own request). /v2/health/ready, per-model statistics, SIGINT/SIGTERM stop.

pytriton 0.7.0 requires numpy<2, so the server runs in an environment of its own (created once by
`--setup` or on first use; docs/triton-serving.md says why), never in the one that runs this command.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from nearl_rt.core.errors import NearlError
from nearl_rt.core.openvino_runtime import PRECISIONS
from nearl_rt.core.session import RUNTIMES

PYTRITON = "nvidia-pytriton==0.7.0"
ENV_VAR = "NEARL_SERVE_ENV"
_MARKER = "nearl-serve-env.json"
# Restricted (token-protected, the token never leaves the process): everything that changes the server.
# Statistics stay open: read-only counters that monitoring and the batch-size checks need.
_RESTRICTED = ["shared-memory", "model-repository", "trace", "logging"]
# Run in the server environment with -I (no cwd, no PYTHONPATH, no user site: nothing of the calling
# environment leaks in); the `nearl_rt` package is imported from its directory alone, because its parent
# may be a site-packages full of numpy-2 builds. What the server runs imports only nearl_rt.core and this
# module (nearl_rt's package face is lazy), so the environment needs no PyTorch.
_BOOTSTRAP = """import importlib.util, sys
d = sys.argv.pop(1)
spec = importlib.util.spec_from_file_location("nearl_rt", d + "/__init__.py", submodule_search_locations=[d])
sys.modules["nearl_rt"] = m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
from nearl_rt.serving.server import serve_main
sys.exit(serve_main(sys.argv[1:]))
"""


class ServeError(NearlError):
    """The server environment or the server cannot be set up (the message names the fix)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.serve", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="an exported MODEL.onnx")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 = all)")
    p.add_argument("--http-port", type=int, default=8000, help="default %(default)s")
    p.add_argument("--grpc-port", type=int, default=8001, help="default %(default)s")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port (default: no metrics)")
    p.add_argument("--name", default="nearl_clip", help="model name (default %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32, help="largest batch the batcher forms (default 32)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="how long the batcher waits for more requests (default %(default)s)")
    p.add_argument("--image-workers", type=int, default=1,
                   help="instances of the image model, i.e. images decoded in parallel (default %(default)s; "
                        "pytriton gives extra instances 1 s to start, which an overloaded machine can miss)")
    p.add_argument("--exit-timeout", type=int, default=5, help="seconds to finish in-flight requests on stop")
    p.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime",
                   help="what runs the model: onnxruntime (default; CUDA when available) or OpenVINO's CPU plugin "
                        "(NearlSession(runtime=...), docs/export.md#cpu-serving)")
    p.add_argument("--precision", choices=sorted(PRECISIONS),
                   help="OpenVINO's inference precision (default f32; bf16 only for a file exported with "
                        "--openvino-bf16, which records that it passed the int8 gates)")
    p.add_argument("--env", help=f"the server environment (default ${ENV_VAR} or {default_env_dir()})")
    p.add_argument("--setup", action="store_true", help="create/refresh the server environment, then exit")
    return p


# ---------------------------------------------------------------- the server environment (calling side)

def default_env_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "nearl-rt" / f"serve-env-py{sys.version_info.major}{sys.version_info.minor}"


def installed(dist: str):
    """`dist==version` of a distribution installed here, else None."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"{dist}=={version(dist)}"
    except PackageNotFoundError:
        return None


def env_requirements() -> list:
    """pytriton with numpy<2, and the same onnxruntime, onnx, OpenVINO, Pillow and DICOM readers (those installed)
    as here, so that the served model decodes and computes what NearlSession does in this environment."""
    runtime = installed("onnxruntime-gpu") or installed("onnxruntime") or "onnxruntime"
    optional = [r for r in map(installed, ("openvino", "pydicom", "python-gdcm")) if r]
    # onnx: NearlSession(runtime="openvino") reads the file's nearl.* metadata with it (nearl_rt.core.metadata)
    return [PYTRITON, "numpy>=1.21,<2", runtime, installed("onnx") or "onnx", installed("pillow") or "pillow",
            *optional]


def base_python() -> str:
    """The interpreter behind this (virtual) environment; the Python-backend stub needs its libpython."""
    python = getattr(sys, "_base_executable", None) or sys.executable
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise ServeError(f"{python} is built without a shared libpython, which Triton's Python-backend stub "
                         f"loads; create the server environment from a Python that has one (e.g. Debian's "
                         f"/usr/bin/python3): `/usr/bin/python3 -m export.serve --setup`")
    return python


def ensure_env(env_dir=None, *, refresh: bool = False) -> Path:
    """The server environment's python, creating the environment if it is missing, incomplete or was made
    for other requirements. Concurrent callers wait on a lock; a half-made environment is never used
    (the marker file is written last)."""
    env_dir = Path(env_dir or os.environ.get(ENV_VAR) or default_env_dir()).expanduser().resolve()
    python = env_dir / "bin" / "python"
    want = {"requirements": env_requirements(), "python": sys.version.split()[0]}
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(env_dir.parent / f".{env_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = env_dir / _MARKER
        if not refresh and marker.is_file() and json.loads(marker.read_text()) == want and python.exists():
            return python
        print(f"export.serve: creating the server environment {env_dir} (once; ~500 MB: "
              f"{' '.join(want['requirements'])})", file=sys.stderr, flush=True)
        shutil.rmtree(env_dir, ignore_errors=True)
        _run([base_python(), "-m", "venv", str(env_dir)], "create the virtual environment")
        _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
              *want["requirements"]], "install the server packages (pip's PIP_INDEX_URL / PIP_FIND_LINKS / "
             "PIP_NO_INDEX select where they come from)")
        modules = "pytriton.triton, numpy, onnxruntime, onnx, PIL, tritonclient.grpc" + (
            ", openvino" if installed("openvino") in want["requirements"] else "")
        _run([str(python), "-I", "-c", f"import {modules}"], "import the installed server packages")
        marker.write_text(json.dumps(want))
    return python


def _run(cmd, what: str) -> None:
    try:
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    except (OSError, subprocess.CalledProcessError) as e:
        raise ServeError(f"could not {what}: {e}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.setup:
        python = ensure_env(args.env, refresh=True)
        print(f"server environment ready: {python}")
        if not args.model:
            return 0
    if not args.model:
        build_parser().error("give MODEL.onnx (or --setup)")
    _check_args(args)
    python = ensure_env(args.env)
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--setup"]
    sys.stdout.flush()
    sys.stderr.flush()
    # exec: the server replaces this process, so signals, the exit status and the pid are the server's.
    package = Path(__file__).resolve().parents[1]  # nearl_rt/
    os.execv(python, [str(python), "-I", "-c", _BOOTSTRAP, str(package), *forwarded])
    return 1  # not reached


def _check_args(args) -> None:
    """Fail here, in one line, before a server environment is made or a server started."""
    from nearl_rt.serving.triton_repository import read_signature
    if not Path(args.model).is_file():
        raise ServeError(f"model not found: {args.model} (export one with `python -m export.onnx CKPT`)")
    read_signature(args.model)  # a nearl-rt export, or a clear error
    for name in ("http_port", "grpc_port"):
        if not 0 < getattr(args, name) < 65536:
            raise ServeError(f"--{name.replace('_', '-')} {getattr(args, name)}: use a port in 1..65535")
    if args.http_port == args.grpc_port:
        raise ServeError("--http-port and --grpc-port must differ")
    if args.precision and args.runtime != "openvino":
        raise ServeError(f"--precision {args.precision} is OpenVINO's: add --runtime openvino (onnxruntime runs the "
                         f"file's own precision)")
    if args.runtime == "openvino" and not installed("openvino"):
        raise ServeError("--runtime openvino needs the openvino package here (the server environment installs the "
                         "same version): pip install 'nearl-rt[openvino]'")
    for name, low in (("max_batch_size", 1), ("max_queue_delay_us", 0), ("image_workers", 1), ("exit_timeout", 1)):
        if getattr(args, name) < low:
            raise ServeError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")


def free_ports(n: int, host: str = "127.0.0.1") -> list:
    """n ports nothing listens on now (the OS picks them)."""
    import socket
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServerProcess:
    """`python -m export.serve MODEL` as a child process, for scripts and tests:

        with ServerProcess("model.onnx", "--max-queue-delay-us", "500") as server:
            ...  # server.http_port, server.grpc_port; both models are ready

    Free loopback ports unless given; `start` waits (bounded) until both models report ready;
    leaving the block stops it with SIGTERM (then SIGKILL after `stop_timeout`)."""

    def __init__(self, model, *args: str, host: str = "127.0.0.1", name: str = "nearl_clip", log=None,
                 start_timeout: float = 240.0, stop_timeout: float = 30.0):
        self.model, self.args, self.host, self.name = Path(model), args, host, name
        self.http_port, self.grpc_port = free_ports(2, host)
        self.log = Path(log) if log else None
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        import time
        if self.proc is not None and self.proc.poll() is None:
            raise ServeError(f"this server is running already (pid {self.proc.pid}); stop() it first")
        out = open(self.log, "w") if self.log else subprocess.DEVNULL
        # this process's nearl_rt (a checkout's or the installed one), whatever the working directory
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nearl_rt.serving.server", str(self.model), "--host", self.host, "--name", self.name,
             "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *self.args],
            env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise ServeError(f"export.serve exited with status {self.proc.returncode} before it was ready"
                                 + (f" (log: {self.log})" if self.log else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"export.serve was not ready after {self.start_timeout:.0f} s")
            time.sleep(0.5)

    def ready(self) -> bool:
        """Both models ready (/v2/health/ready alone is true before pytriton has loaded any model)."""
        import urllib.request
        for path in ("health/ready", f"models/{self.name}/ready", f"models/{self.name}_image/ready"):
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/v2/{path}", timeout=5) as r:
                    if r.status != 200:
                        return False
            except OSError:
                return False
        return True

    def stop(self) -> int:
        """SIGTERM, wait; SIGKILL if it outlives stop_timeout. Returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ---------------------------------------------------------------- the server (runs in the server environment)

def serve_main(argv) -> int:
    """Entry point inside the server environment (started by main through _BOOTSTRAP)."""
    import signal
    import tempfile
    import time

    args = build_parser().parse_args(argv)
    # The Python-backend stub must load the libpython of the interpreter whose standard library it uses.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    # A plain list, not a threading.Event: a handler that takes a lock the interrupted main thread
    # holds (Event.wait does) deadlocks.
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    with tempfile.TemporaryDirectory(prefix="nearl-serve-") as workspace:
        try:
            triton, forwarders = _start(args, Path(workspace))
        except (ServeError, ValueError, OSError) as e:
            print(f"python -m export.serve: error: {e}", file=sys.stderr, flush=True)
            return 2
        try:
            host = args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1"
            print(f"serving {args.name} and {args.name}_image on http://{host}:{args.http_port} and "
                  f"grpc {host}:{args.grpc_port} (ready; Ctrl-C or SIGTERM stops)", flush=True)
            while not stop:
                time.sleep(0.5)
                if not stop and not triton.is_alive():
                    print("export.serve: tritonserver exited unexpectedly", file=sys.stderr, flush=True)
                    return 1
        finally:
            for f in forwarders:  # their gRPC channels would hold the image model's instances open
                f.close()
            triton.stop()
    print("export.serve: stopped", flush=True)
    return 0


class ClientInputError(ValueError):
    """A request's own content is wrong (an undecodable image): the client gets a 4xx with this message."""


# pytriton 0.7 maps every exception of a bound function to INTERNAL (HTTP 500) and writes no label files. Both are
# added to what it sends tritonserver to load each model (Model.get_model_config, Model.get_proxy_model_files): a
# label file on `probs`, and in its proxy model.py the exact block that turns an error into a TritonModelException
# gains a branch for ClientInputError, answered per request with TritonError(INVALID_ARG) (HTTP 400, gRPC
# INVALID_ARGUMENT).
_PYTRITON_ERROR_BLOCK = """                if error:
                    assert eos
                    triton_responses_or_error = pb_utils.TritonModelException(  # pytype: disable=module-attr
                        responses_payload.decode("utf-8")
                    )
"""
_CLIENT_ERROR_BLOCK = """                if error:
                    assert eos
                    _text = responses_payload.decode("utf-8").strip()
                    _last = _text.splitlines()[-1] if _text else ""
                    if _last.startswith("{marker}: "):  # nearl-rt: a client's bad input is a 4xx
                        triton_responses_or_error = [pb_utils.InferenceResponse(error=pb_utils.TritonError(
                            _last[len("{marker}: "):], pb_utils.TritonError.INVALID_ARG)) for _ in triton_requests]
                    else:
                        triton_responses_or_error = pb_utils.TritonModelException(  # pytype: disable=module-attr
                            responses_payload.decode("utf-8")
                        )
"""


def _extend_pytriton(labels: dict) -> None:
    """Give the models pytriton loads what its API cannot express: a label file (Triton's classification
    extension: `score:index:label`) on the `probs` output of the models named in `labels`, and 4xx answers for
    ClientInputError. Raises ServeError when the installed pytriton is not the one this was written for."""
    from pytriton.models.model import Model

    from nearl_rt.serving.triton_repository import LABELS_FILE
    get_config, get_files = Model.get_model_config, Model.get_proxy_model_files
    marker = f"{ClientInputError.__module__}.{ClientInputError.__qualname__}"

    def get_model_config(self) -> dict:
        config = get_config(self)
        if self.model_name in labels:
            for out in config.get("output", []):
                if out["name"] == "probs":
                    out["label_filename"] = LABELS_FILE
        return config

    def get_proxy_model_files(self) -> dict:
        files = get_files(self)
        key = f"file:{self.model_version}/model.py"
        code = files[key].decode()
        if _PYTRITON_ERROR_BLOCK not in code:
            raise ServeError(f"{PYTRITON} is required (the installed pytriton's model.py differs): recreate the "
                             f"server environment with `python -m export.serve --setup`")
        files[key] = code.replace(_PYTRITON_ERROR_BLOCK, _CLIENT_ERROR_BLOCK.replace("{marker}", marker)).encode()
        if self.model_name in labels:
            files[f"file:{LABELS_FILE}"] = "".join(f"{c}\n" for c in labels[self.model_name]).encode()
        return files

    Model.get_model_config, Model.get_proxy_model_files = get_model_config, get_proxy_model_files


def _start(args, workspace: Path):
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    from nearl_rt.core.session import NearlSession

    session = NearlSession(args.model, runtime=args.runtime, precision=args.precision)
    _extend_pytriton({args.name: session.class_names})
    h, w = session.input_size
    n_classes = len(session.class_names)
    outputs = [Tensor(name=n, dtype=np.float32, shape=(n_classes,)) for n in ("logits", "probs")]

    @batch
    def classify(images):
        logits, probs = session.run(images)
        return {"logits": logits, "probs": probs}

    config = TritonConfig(http_address=args.host, grpc_address=args.host, http_port=args.http_port,
                          grpc_port=args.grpc_port, allow_metrics=bool(args.metrics_port),
                          metrics_port=args.metrics_port or None, exit_timeout_secs=args.exit_timeout,
                          log_verbose=0)
    triton = Triton(config=config, workspace=workspace / "pytriton",
                    security_config=TritonSecurityConfig(restricted_endpoints=_RESTRICTED))
    triton.bind(args.name, classify, inputs=[Tensor(name="images", dtype=np.float32, shape=(3, h, w))],
                outputs=outputs, strict=True,
                config=ModelConfig(max_batch_size=args.max_batch_size,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)))
    host = args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1"
    forwarders = [ImageForwarder(session, f"{host}:{args.grpc_port}", args.name, args.max_batch_size)
                for _ in range(args.image_workers)]
    triton.bind(f"{args.name}_image", [f.infer for f in forwarders],
                inputs=[Tensor(name="image_bytes", dtype=np.object_, shape=(-1,))],
                outputs=[Tensor(name=n, dtype=np.float32, shape=(-1, n_classes)) for n in ("logits", "probs")],
                config=ModelConfig(batching=False), strict=True)
    try:
        triton.run()
    except Exception as e:  # noqa: BLE001 - pytriton raises its own types; name the cause in one line
        triton.stop()
        raise ServeError(f"tritonserver did not start: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                         f"(a port in use? choose others with --http-port/--grpc-port)") from None
    return triton, forwarders


class ImageForwarder:
    """One image-decoding instance: bytes -> NearlSession.preprocess -> the batched classifier over gRPC."""

    def __init__(self, session, url: str, model: str, max_batch: int):
        self.session, self.url, self.model, self.max_batch = session, url, model, max_batch
        self._client = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _refuse(self, reason: str) -> ClientInputError:
        """The error for a client's bad request, named in the server's log too."""
        print(f"export.serve: a request to {self.model}_image was refused: {reason}", file=sys.stderr, flush=True)
        return ClientInputError(reason)

    def infer(self, requests):
        return [self._one(r["image_bytes"]) for r in requests]

    def _one(self, encoded):
        import tempfile

        import numpy as np
        import tritonclient.grpc as grpcclient

        from nearl_rt.core.imaging import load_image

        images = []
        with tempfile.TemporaryDirectory(prefix="nearl-image-") as tmp:
            for i, data in enumerate(encoded.reshape(-1)):
                # A file, so that DICOM, 16-bit and multi-frame images are read exactly as
                # NearlSession.predict reads a path (nearl_rt.core.imaging, the model's intensity policy).
                path = os.path.join(tmp, f"image_bytes[{i}]")
                with open(path, "wb") as f:
                    f.write(bytes(data))
                try:
                    images.append(load_image(path, self.session.intensity))
                except (OSError, ValueError) as e:  # nearl_rt.core.imaging.ImageError is a ValueError
                    raise self._refuse(f"image_bytes[{i}] is not a decodable image ({str(e).replace(path, 'it')}); "
                                       f"send PNG/JPEG/DICOM/... file contents") from None
        if not images:
            raise self._refuse("image_bytes is empty: send at least one encoded image")
        batch = self.session.preprocess(images)
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        logits, probs = [], []
        for start in range(0, len(batch), self.max_batch):
            chunk = batch[start:start + self.max_batch]
            inp = grpcclient.InferInput("images", chunk.shape, "FP32")
            inp.set_data_from_numpy(chunk)
            result = self._client.infer(self.model, [inp])
            logits.append(result.as_numpy("logits"))
            probs.append(result.as_numpy("probs"))
        return {"logits": np.concatenate(logits), "probs": np.concatenate(probs)}


if __name__ == "__main__":
    from nearl_rt.core.cli import run_cli
    sys.exit(run_cli(main, prog="python -m export.serve"))
