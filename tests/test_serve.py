"""export.serve under load and faults on 127.0.0.1, and export.triton's production repository through the same
tritonserver binary's config checks.

The server environment (pytriton, numpy<2) is created once per machine by export.serve.ensure_env (the
first run pays ~2 minutes of pip install; where it cannot be made, these tests skip, saying why, except
under .ci/run, which requires it); the clients run there too (tests/serve_client.py), the
comparison with NearlSession runs here. Every wait is bounded; the server is always killed at the end.
"""
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.special import softmax

from nearl_rt.bench.decode import write_dicom
from nearl_rt.core.session import NearlSession
from nearl_rt.export.quantize import Gates, verify_runtime_precision
from nearl_rt.serving.server import ServeError, ServerProcess, ensure_env, free_ports, main as serve_cli
from nearl_rt.serving.triton_repository import Options, write_repository
from tests.export_cases import (CALIBRATION, TINY_PREPROCESS_PROBS_ATOL, exported, exported_calibrated,
                                exported_with_preprocess)

CLIENT = Path(__file__).with_name("serve_client.py")
STANDIN = Path(__file__).with_name("triton_standin_model.py")
HOST = "127.0.0.1"


REQUIRE_ENV = "NEARL_REQUIRE_SERVE_ENV"  # set by .ci/run: there a missing server environment is a failure


@pytest.fixture(scope="module")
def server_python():
    try:
        return ensure_env()
    except ServeError as e:
        if os.environ.get(REQUIRE_ENV):
            raise
        pytest.skip(f"no server environment for export.serve ({e}); `python -m export.serve --setup` makes it "
                    f"(needs PyPI or PIP_FIND_LINKS with nvidia-pytriton)")


def port_free(port) -> bool:
    """Nothing listens on `port`: a new server can bind it (SO_REUSEADDR, as servers do, so that the
    TIME_WAIT left by closed client connections does not count; a listening socket still does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


class Server(ServerProcess):
    def __init__(self, python, model, log, *args):
        # A long queue delay so that 16 concurrent clients are certain to be batched together.
        super().__init__(model, "--max-batch-size", "8", "--max-queue-delay-us", "100000", "--exit-timeout", "3",
                         *args, host=HOST, log=log)
        self.python = python

    def client(self, mode, arrays, tmp_path):
        src = tmp_path / f"{mode}-in.npz"
        dst = tmp_path / f"{mode}-out{'.npz' if mode == 'load' else '.json'}"
        np.savez(src, **arrays)
        done = subprocess.run([str(self.python), "-I", str(CLIENT), mode, HOST, str(self.http_port),
                               str(self.grpc_port), self.name, str(src), str(dst)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:] + "\nserver log:\n" + self.tail()
        return dst

    def tail(self, n=40):
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="module")
def server(server_python, tmp_path_factory):
    # a calibrated model: its probs are softmax(logits / T), what every serving path must return
    s = Server(server_python, exported_calibrated("bidirectional"), tmp_path_factory.mktemp("serve") / "server.log")
    try:
        s.start()
    except ServeError as e:
        pytest.fail(f"{e}:\n{s.tail()}")
    try:
        yield s
    finally:
        s.stop()


def _encoded(rng, h, w, gray, fmt, tmp_path):
    """File bytes (a uint8 array) of a random image; PNG16 = 16-bit greyscale PNG, DICOM = a uint16 DICOM."""
    if fmt == "DICOM":
        write_dicom(tmp_path / "image.dcm", rng.integers(0, 4096, (h, w), dtype=np.uint16), bits_stored=12,
                    RescaleSlope=2, RescaleIntercept=-1024)
        return np.frombuffer((tmp_path / "image.dcm").read_bytes(), np.uint8)
    if fmt == "PNG16":
        pixels, fmt = rng.integers(0, 65536, (h, w), dtype=np.uint16), "PNG"
    else:
        pixels = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return np.frombuffer(buf.getvalue(), np.uint8)


def _images(rng, tmp_path):
    """Encoded images of odd sizes: gray and RGB PNG and JPEG, 16-bit PNG, DICOM (file bytes as uint8 arrays)."""
    cases = [(40, 50, False, "PNG"), (33, 77, True, "PNG"), (96, 20, False, "PNG16"), (32, 32, False, "PNG"),
             (64, 64, False, "JPEG"), (21, 90, True, "JPEG"), (120, 80, False, "DICOM"), (50, 33, False, "JPEG")]
    return {f"img{i}": _encoded(rng, *case, tmp_path) for i, case in enumerate(cases)}


def test_64_concurrent_requests_over_http_and_grpc_equal_nearlsession(server, tmp_path):
    rng = np.random.default_rng(7)
    xs = {f"x{i}": rng.standard_normal((1 + i % 3, 3, 32, 32)).astype(np.float32) for i in range(64)}
    images = _images(rng, tmp_path)
    out = np.load(server.client("load", {**xs, **images}, tmp_path))
    session = NearlSession(server.model, providers=["CPUExecutionProvider"])
    assert session.temperature == CALIBRATION.temperature
    # The server runs the same onnxruntime build on batches of other compositions: float32 GEMMs may
    # block differently per batch size (a few ulp of logits of magnitude <= ~100).
    for key, x in xs.items():
        logits, probs = session.run(x)
        np.testing.assert_allclose(out[f"{key}_logits"], logits, rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(out[f"{key}_probs"], probs, rtol=1e-5, atol=1e-6, err_msg=key)
        calibrated = softmax(out[f"{key}_logits"].astype(np.float64) / session.temperature, axis=1)
        np.testing.assert_allclose(out[f"{key}_probs"], calibrated, rtol=0, atol=1e-5, err_msg=key)
    for key, encoded in images.items():
        path = tmp_path / key  # no suffix: the server does not know the format either
        path.write_bytes(encoded.tobytes())
        logits, probs = session.run(session.preprocess([path]))  # what NearlSession.predict does with a file
        np.testing.assert_allclose(out[f"{key}_probs"], probs, rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(out[f"{key}_logits"], logits, rtol=1e-5, atol=1e-5, err_msg=key)
    batches = out["batch_sizes"]
    assert batches.sum() == sum(len(x) for x in xs.values()) + len(images)  # every image went through the batcher
    assert batches.max() > 1, f"the dynamic batcher never formed a batch > 1: {sorted(batches)}"
    assert batches.max() <= 8


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server, tmp_path):
    rng = np.random.default_rng(8)
    arrays = {"valid": rng.standard_normal((2, 3, 32, 32)).astype(np.float32), "img0": _images(rng, tmp_path)["img0"]}
    report = json.loads(server.client("faults", arrays, tmp_path).read_text())
    top2 = report.pop("classification")
    session = NearlSession(server.model, providers=["CPUExecutionProvider"])
    probs = session.run(arrays["valid"])[1]
    for protocol, rows in top2.items():  # "score:index:label", as from a repository's labels.txt
        for row, p in zip(rows, probs):
            want = [f"{p[c]:.6f}:{c}:{session.class_names[c]}" for c in np.argsort(-p, kind="stable")[:2]]
            assert [r.rsplit(":", 2)[1:] for r in row] == [w.rsplit(":", 2)[1:] for w in want], (protocol, row, want)
            np.testing.assert_allclose([float(r.split(":")[0]) for r in row], np.sort(p)[::-1][:2], atol=1e-5)
    client_errors = {"undecodable bytes", "truncated image"}
    for case in client_errors:  # the client's own bad input: 4xx / INVALID_ARGUMENT with the decoder's reason
        assert report[case]["status"] in ("400", "StatusCode.INVALID_ARGUMENT"), (case, report[case])
    assert "image_bytes[0] is not a decodable image" in server.log.read_text(errors="replace")  # the log names it
    expected = {"wrong dtype": "FP64", "wrong shape": "unexpected shape", "wrong channels": "unexpected shape",
                "empty batch": "", "undecodable bytes": "image_bytes[0] is not a decodable image",
                "truncated image": "image_bytes[0] is not a decodable image", "no images": "",
                "unknown model": "no_such_model", "disconnect mid-upload": "client left",
                "disconnect before the answer": "client left"}
    assert set(report) == set(expected)
    for case, fragment in expected.items():
        assert report[case]["error"] is not None, f"{case}: no error response"
        assert fragment in report[case]["error"], f"{case}: {report[case]['error'][:300]}"
        assert report[case]["next_ok"], f"the next valid request after '{case}' failed"
    assert server.proc.poll() is None and server.ready()


def test_sigterm_stops_the_server_and_frees_its_ports(server):
    server.proc.send_signal(signal.SIGTERM)
    status = server.proc.wait(timeout=30)
    assert status == 0, f"exit status {status}:\n{server.tail()}"
    assert "export.serve: stopped" in server.tail()
    assert port_free(server.http_port) and port_free(server.grpc_port)


def test_openvino_runtime_serves_what_nearlsession_computes_on_openvino(server_python, tmp_path):
    pytest.importorskip("openvino")
    model = exported_calibrated("bidirectional")
    rng = np.random.default_rng(9)
    xs = {f"x{i}": rng.standard_normal((1 + i % 3, 3, 32, 32)).astype(np.float32) for i in range(16)}
    images = dict(list(_images(rng, tmp_path).items())[:4])
    with Server(server_python, model, tmp_path / "server.log", "--runtime", "openvino") as server:
        out = np.load(server.client("load", {**xs, **images}, tmp_path))
    session = NearlSession(model, runtime="openvino")
    for key, x in xs.items():  # the same OpenVINO build; batches of other compositions (see the test above)
        logits, probs = session.run(x)
        np.testing.assert_allclose(out[f"{key}_logits"], logits, rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(out[f"{key}_probs"], probs, rtol=1e-5, atol=1e-6, err_msg=key)
    for key, encoded in images.items():
        path = tmp_path / key
        path.write_bytes(encoded.tobytes())
        np.testing.assert_allclose(out[f"{key}_probs"], session.run(session.preprocess([path]))[1], rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    assert out["batch_sizes"].max() > 1


def test_openvino_bf16_needs_a_verified_file(server_python, tmp_path):
    pytest.importorskip("openvino")
    server = Server(server_python, exported("bidirectional"), tmp_path / "server.log", "--runtime", "openvino",
                    "--precision", "bf16")
    with pytest.raises(ServeError, match="exited with status 2"):
        server.start()
    assert "records no verification of OpenVINO bf16" in server.tail(), server.tail()
    with pytest.raises(ServeError, match="--precision bf16 is OpenVINO's: add --runtime openvino"):
        serve_cli([str(exported("bidirectional")), "--precision", "bf16"])


def _tritonserver_binary(python) -> Path:
    return next(Path(python).parent.parent.glob("lib/python*/site-packages/pytriton/tritonserver"))


def _tritonserver_args(binary, repo, backends, ports):
    return [str(binary / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}",
            f"--http-address={HOST}", f"--grpc-address={HOST}", f"--http-port={ports[0]}", f"--grpc-port={ports[1]}",
            "--allow-metrics=false", "--exit-timeout-secs=2", "--exit-on-error=true"]


def _tritonserver_log(python, repo):
    binary = _tritonserver_binary(python)
    done = subprocess.run(_tritonserver_args(binary, repo, binary / "backends", free_ports(2, HOST)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0  # without the onnxruntime backend no model can load
    return done.stdout + done.stderr


def test_production_repository_passes_tritons_own_config_checks(server_python, tmp_path):
    write_repository(exported("bidirectional"), tmp_path, Options(name="cpu_model", gpu=False, instances=2))
    write_repository(exported_with_preprocess("bidirectional"), tmp_path,
                     Options(name="gpu_trt", version=3, tensorrt_fp16=True, with_preprocess=True))
    if importlib.util.find_spec("openvino"):
        with tempfile.TemporaryDirectory() as source:  # outside the repository: Triton reads every entry of it
            verified = Path(source) / "model.onnx"
            shutil.copyfile(exported("bidirectional"), verified)
            verify_runtime_precision(verified, "openvino", "bf16", gates=Gates(min_agreement=0.0,
                                                                                max_accuracy_change=100.0))
            write_repository(verified, tmp_path, Options(name="cpu_openvino", gpu=False, backend="openvino",
                                                         max_batch_size=8))
    backends = {"cpu_model": "onnxruntime", "gpu_trt": "onnxruntime", "gpu_trt_preprocess": "onnxruntime",
                "cpu_openvino": "openvino"}
    # A control that Triton must refuse in its core checks, so the test can tell a check from no check.
    shutil.copytree(tmp_path / "cpu_model", tmp_path / "bad_model")
    config = tmp_path / "bad_model" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "cpu_model"', 'name: "bad_model"').replace(
        "dynamic_batching {", "dynamic_batching {\n  preferred_batch_size: 128"))
    log = _tritonserver_log(server_python, tmp_path)
    assert "dynamic batching preferred size must be <= max batch size for bad_model" in log, log[-3000:]
    for name, version in (("cpu_model", 1), ("gpu_trt", 3), ("gpu_trt_preprocess", 3), ("cpu_openvino", 1)):
        if not (tmp_path / name).is_dir():
            continue
        failures = [line for line in log.splitlines() if f"failed to load '{name}' version" in line]
        assert failures, f"{name} was never loaded by tritonserver:\n{log[-3000:]}"
        assert all(f"version {version}: Invalid argument: unable to find backend library for backend "
                   f"'{backends[name]}'" in line for line in failures), failures
        assert not [line for line in log.splitlines() if "Poll failed" in line and f"'{name}'" in line]
    # Triton checks an ensemble's wiring only once its models are loaded: see the next test.
    assert "ensemble 'gpu_trt_image' depends on 'gpu_trt' which has no loaded version" in log, log[-3000:]


def _post(port, model, body):
    request = urllib.request.Request(f"http://{HOST}:{port}/v2/models/{model}/infer", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return {o["name"]: o for o in json.loads(r.read())["outputs"]}


def _standin_server(python, repo, tmp_path):
    """tritonserver with the Python backend set up as pytriton sets it up (its stub for the server
    environment's Python; that environment first on PATH, its libpython on LD_LIBRARY_PATH)."""
    binary = _tritonserver_binary(python)
    backends = tmp_path / "backends"
    shutil.copytree(binary / "backends", backends)
    version, libdir = subprocess.run(
        [str(python), "-I", "-c", "import sys, sysconfig; print('%d.%d' % sys.version_info[:2]); "
                                  "print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True, text=True, check=True).stdout.split()
    shutil.copy(binary / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    # The stub's libraries (CUDA runtime, ...) are found by a path relative to its wheel location; the copy
    # needs them named, as pytriton does.
    libs = binary.parent.parent / "nvidia_pytriton.libs"
    env = {**os.environ, "PATH": f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "LD_LIBRARY_PATH": f"{libdir}{os.pathsep}{libs}"}
    ports = free_ports(2, HOST)
    log = open(tmp_path / "tritonserver.log", "w")
    proc = subprocess.Popen(_tritonserver_args(binary, repo, backends, ports), stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    return proc, ports[0], tmp_path / "tritonserver.log"


def test_with_preprocess_ensemble_serves_through_tritonserver(server_python, tmp_path):
    """nearl_rt.serving.triton_repository's repository with --with-preprocess, the onnxruntime backend replaced by a Python stand-in
    that runs the same model.onnx files: Triton accepts the ensemble's wiring and it answers uint8 images of
    any size with what NearlSession computes through the same preprocessing graph."""
    model = exported_with_preprocess("bidirectional", precision="calibrated")  # probs = softmax(logits / T)
    repo = tmp_path / "repo"
    write_repository(model, repo, Options(gpu=False, with_preprocess=True, max_batch_size=8))
    for name in ("nearl_clip", "nearl_clip_preprocess"):
        config = repo / name / "config.pbtxt"
        assert config.read_text().count('backend: "onnxruntime"') == 1
        config.write_text(config.read_text().replace('backend: "onnxruntime"', 'backend: "python"'))
        shutil.copyfile(STANDIN, repo / name / "1" / "model.py")
    proc, port, log = _standin_server(server_python, repo, tmp_path)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/v2/models/nearl_clip_image/ready", timeout=5):
                    break
            except OSError:
                assert proc.poll() is None, f"tritonserver exited:\n{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, f"the ensemble was not ready:\n{log.read_text()[-4000:]}"
                time.sleep(0.5)
        graph = NearlSession(model, providers=["CPUExecutionProvider"], preprocess="onnx")
        assert graph.temperature == CALIBRATION.temperature
        pillow = NearlSession(model, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(11)
        for h, w, c in ((37, 53, 3), (64, 20, 1), (32, 32, 3), (101, 77, 3)):
            image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
            out = _post(port, "nearl_clip_image", {"inputs": [{"name": "image", "shape": [1, h, w, c],
                                                               "datatype": "UINT8", "data": image.ravel().tolist()}]})
            assert out["probs"]["shape"] == [1, 3]
            probs = np.array(out["probs"]["data"], np.float32).reshape(1, 3)
            logits = np.array(out["logits"]["data"], np.float32).reshape(1, 3)
            want_logits, want_probs = graph.run(graph.preprocess([image]))
            # The same graphs on the same onnxruntime build: float32 rounding only.
            np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5, err_msg=f"{h}x{w}x{c}")
            np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6, err_msg=f"{h}x{w}x{c}")
            np.testing.assert_allclose(probs, softmax(logits.astype(np.float64) / graph.temperature, axis=1),
                                       rtol=0, atol=1e-5, err_msg=f"{h}x{w}x{c}")
            # Pillow's resize vs the graph's: nearl_rt/export/preprocess_graph.py's bound for the tiny model.
            np.testing.assert_allclose(probs, pillow.run(pillow.preprocess([image]))[1], rtol=0,
                                       atol=TINY_PREPROCESS_PROBS_ATOL)
        # labels.txt through Triton's classification extension: top-2 "score:index:label" on the classifier.
        x = graph.preprocess([rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)])
        out = _post(port, "nearl_clip", {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                                     "data": x.ravel().tolist()}],
                                         "outputs": [{"name": "probs", "parameters": {"classification": 2}}]})
        _, probs = graph.run(x)
        order = np.argsort(-probs[0])[:2]
        assert [entry.split(":", 2)[1:] for entry in out["probs"]["data"]] == \
            [[str(i), graph.class_names[i]] for i in order]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_multi_label_model_serves_per_finding_probabilities(server_python, tmp_path):
    """A multi-label export (issue 23: probs = per-finding sigmoid probabilities [B, F]) is served as NearlSession
    computes it. Its own server: ~100 s here, most of it Triton's start."""
    import warnings
    from nearl_rt.export.onnx import export_model
    from tests.helpers import FINDINGS, tiny
    model = tiny()
    model.set_findings(FINDINGS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_model(model.eval(), tmp_path / "findings.onnx")
    rng = np.random.default_rng(2)
    xs = {f"x{i}": rng.standard_normal((1 + i % 2, 3, 32, 32)).astype(np.float32) for i in range(4)}
    with Server(server_python, path, tmp_path / "server.log") as s:
        out = np.load(s.client("load", xs, tmp_path))
    session = NearlSession(path, providers=["CPUExecutionProvider"])
    assert session.multi_label
    for key, x in xs.items():
        logits, probs = session.run(x)
        assert out[f"{key}_probs"].shape == (len(x), len(FINDINGS))
        np.testing.assert_allclose(out[f"{key}_probs"], probs, rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(out[f"{key}_probs"], 1 / (1 + np.exp(-out[f"{key}_logits"].astype(np.float64))),
                                   atol=1e-5, err_msg=key)
