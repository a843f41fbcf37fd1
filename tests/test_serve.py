"""export.serve under load and faults on 127.0.0.1, and export.triton's production repository through the same
tritonserver binary's config checks.

The server environment (pytriton, numpy<2) is created once per machine by export.serve.ensure_env (the
first run pays ~1 minute of pip install); the clients run there too (tests/serve_client.py), the
comparison with NearlSession runs here. Every wait is bounded; the server is always killed at the end.
"""
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.runtime import NearlSession
from export.serve import ServeError, ServerProcess, ensure_env, free_ports
from export.triton import Options, write_repository
from tests.export_cases import exported

CLIENT = Path(__file__).with_name("serve_client.py")
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def server_python():
    return ensure_env()


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
    def __init__(self, python, model, log):
        # A long queue delay so that 16 concurrent clients are certain to be batched together.
        super().__init__(model, "--max-batch-size", "8", "--max-queue-delay-us", "100000", "--exit-timeout", "3",
                         host=HOST, log=log)
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
    s = Server(server_python, exported("bidirectional"), tmp_path_factory.mktemp("serve") / "server.log")
    try:
        s.start()
    except ServeError as e:
        pytest.fail(f"{e}:\n{s.tail()}")
    with s:
        yield s


def _encoded(rng, h, w, gray, fmt):
    pixels = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return np.frombuffer(buf.getvalue(), np.uint8)


def _images(rng):
    """Encoded images of odd sizes, gray and RGB, PNG and JPEG (file bytes as uint8 arrays)."""
    cases = [(40, 50, False, "PNG"), (33, 77, True, "PNG"), (96, 20, False, "PNG"), (32, 32, False, "PNG"),
             (64, 64, False, "JPEG"), (21, 90, True, "JPEG"), (120, 80, False, "PNG"), (50, 33, False, "JPEG")]
    return {f"img{i}": _encoded(rng, *case) for i, case in enumerate(cases)}


def test_64_concurrent_requests_over_http_and_grpc_equal_nearlsession(server, tmp_path):
    rng = np.random.default_rng(7)
    xs = {f"x{i}": rng.standard_normal((1 + i % 3, 3, 32, 32)).astype(np.float32) for i in range(64)}
    images = _images(rng)
    out = np.load(server.client("load", {**xs, **images}, tmp_path))
    session = NearlSession(server.model, providers=["CPUExecutionProvider"])
    # The server runs the same onnxruntime build on batches of other compositions: float32 GEMMs may
    # block differently per batch size (a few ulp of logits of magnitude <= ~100).
    for key, x in xs.items():
        logits, probs = session.run(x)
        np.testing.assert_allclose(out[f"{key}_logits"], logits, rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(out[f"{key}_probs"], probs, rtol=1e-5, atol=1e-6, err_msg=key)
    for key, encoded in images.items():
        with Image.open(io.BytesIO(encoded.tobytes())) as im:  # what NearlSession.predict does with a file
            logits, probs = session.run(session.preprocess([im.convert("RGB")]))
        np.testing.assert_allclose(out[f"{key}_probs"], probs, rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(out[f"{key}_logits"], logits, rtol=1e-5, atol=1e-5, err_msg=key)
    batches = out["batch_sizes"]
    assert batches.sum() == sum(len(x) for x in xs.values()) + len(images)  # every image went through the batcher
    assert batches.max() > 1, f"the dynamic batcher never formed a batch > 1: {sorted(batches)}"
    assert batches.max() <= 8


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server, tmp_path):
    rng = np.random.default_rng(8)
    arrays = {"valid": rng.standard_normal((2, 3, 32, 32)).astype(np.float32), "img0": _images(rng)["img0"]}
    report = json.loads(server.client("faults", arrays, tmp_path).read_text())
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


def _tritonserver_log(python, repo):
    binary = next(Path(python).parent.parent.glob("lib/python*/site-packages/pytriton/tritonserver"))
    http, grpc = free_ports(2, HOST)
    done = subprocess.run(
        [str(binary / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={binary}/backends",
         f"--http-address={HOST}", f"--grpc-address={HOST}", f"--http-port={http}", f"--grpc-port={grpc}",
         "--allow-metrics=false", "--exit-timeout-secs=2", "--exit-on-error=true"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode != 0  # without the onnxruntime backend no model can load
    return done.stdout + done.stderr


def test_production_repository_passes_tritons_own_config_checks(server_python, tmp_path):
    write_repository(exported("bidirectional"), tmp_path, Options(name="cpu_model", gpu=False, instances=2))
    write_repository(exported("bidirectional"), tmp_path, Options(name="gpu_trt", version=3, tensorrt_fp16=True))
    # A control that Triton must refuse in its core checks, so the test can tell a check from no check.
    shutil.copytree(tmp_path / "cpu_model", tmp_path / "bad_model")
    config = tmp_path / "bad_model" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "cpu_model"', 'name: "bad_model"').replace(
        "dynamic_batching {", "dynamic_batching {\n  preferred_batch_size: 128"))
    log = _tritonserver_log(server_python, tmp_path)
    assert "dynamic batching preferred size must be <= max batch size for bad_model" in log, log[-3000:]
    for name, version in (("cpu_model", 1), ("gpu_trt", 3)):
        failures = [line for line in log.splitlines() if f"failed to load '{name}' version" in line]
        assert failures, f"{name} was never loaded by tritonserver:\n{log[-3000:]}"
        assert all(f"version {version}: Invalid argument: unable to find backend library for backend "
                   f"'onnxruntime'" in line for line in failures), failures
        assert not [line for line in log.splitlines() if "Poll failed" in line and f"'{name}'" in line]
