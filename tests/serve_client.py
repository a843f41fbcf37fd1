"""Clients for tests/test_serve.py, run by the server environment's python (tritonclient lives there).

    python serve_client.py load   HOST HTTP_PORT GRPC_PORT MODEL IN.npz OUT.npz
    python serve_client.py faults HOST HTTP_PORT GRPC_PORT MODEL IN.npz OUT.json

IN.npz holds float32 request batches `x0..`, one valid batch `valid`, and encoded images `img0..` (uint8
arrays of the file bytes). Comparison with NearlSession happens in the test, in the project's environment.
"""
import json
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

CLIENTS = 16


def _lib(protocol):
    return httpclient if protocol == "http" else grpcclient


def connect(protocol, host, ports):
    url = f"{host}:{ports[protocol]}"
    return httpclient.InferenceServerClient(url, network_timeout=120.0) if protocol == "http" \
        else grpcclient.InferenceServerClient(url)


def infer(client, protocol, model, name, array, datatype):
    inp = _lib(protocol).InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    result = client.infer(model, [inp])
    return result.as_numpy("logits"), result.as_numpy("probs")


def load(host, ports, model, data, out):
    xs = sorted((k for k in data if k.startswith("x")), key=lambda k: int(k[1:]))
    imgs = sorted((k for k in data if k.startswith("img")), key=lambda k: int(k[3:]))
    jobs = [(k, "http" if i % 2 else "grpc") for i, k in enumerate(xs + imgs)]

    def run(job):
        key, protocol = job
        client = connect(protocol, host, ports)
        if key.startswith("x"):
            return key, infer(client, protocol, model, "images", data[key], "FP32")
        encoded = np.array([data[key].tobytes()], dtype=np.object_)
        return key, infer(client, protocol, f"{model}_image", "image_bytes", encoded, "BYTES")

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = dict(pool.map(run, jobs))
    stats = connect("grpc", host, ports).get_inference_statistics(model, as_json=True)
    batches = [int(b["batch_size"]) for s in stats["model_stats"] for b in s.get("batch_stats", [])
               for _ in range(int(b["compute_infer"]["count"]))]
    arrays = {f"{k}_{n}": v for k, (lg, pr) in results.items() for n, v in (("logits", lg), ("probs", pr))}
    np.savez(out, batch_sizes=np.array(batches), **arrays)


def faults(host, ports, model, data, out):
    valid = data["valid"]
    img = np.array([data["img0"].tobytes()], dtype=np.object_)
    cases = {
        "wrong dtype": (model, "images", valid.astype(np.float64), "FP64"),
        "wrong shape": (model, "images", valid[:, :, :-1], "FP32"),
        "wrong channels": (model, "images", np.concatenate([valid, valid], axis=1), "FP32"),
        "empty batch": (model, "images", valid[:0], "FP32"),
        "undecodable bytes": (f"{model}_image", "image_bytes", np.array([b"not an image\x00"], dtype=np.object_),
                              "BYTES"),
        "truncated image": (f"{model}_image", "image_bytes", np.array([img[0][:40]], dtype=np.object_), "BYTES"),
        "no images": (f"{model}_image", "image_bytes", np.array([], dtype=np.object_), "BYTES"),
        "unknown model": ("no_such_model", "images", valid, "FP32"),
    }
    report = {}
    for i, (case, (target, name, array, datatype)) in enumerate(cases.items()):
        protocol = "http" if i % 2 else "grpc"
        client = connect(protocol, host, ports)
        try:
            infer(client, protocol, target, name, array, datatype)
            error = status = None
        except InferenceServerException as e:
            error, status = str(e), str(e.status())
        report[case] = {"error": error, "status": status, "protocol": protocol,
                        "next_ok": _valid_ok(client, protocol, model, valid)}
    for case, disconnect in (("disconnect mid-upload", _disconnect_mid_upload),
                             ("disconnect before the answer", _disconnect_before_answer)):
        disconnect(host, ports["http"], model, valid)
        report[case] = {"error": "client left", "next_ok": _valid_ok(connect("grpc", host, ports), "grpc", model,
                                                                       valid)}
    report["classification"] = {protocol: _top2(connect(protocol, host, ports), protocol, model, valid)
                                for protocol in ("http", "grpc")}
    with open(out, "w") as f:
        json.dump(report, f)


def _top2(client, protocol, model, valid) -> list:
    """Triton's classification extension on `probs`: the top-2 'score:index:label' strings per image."""
    lib = _lib(protocol)
    inp = lib.InferInput("images", list(valid.shape), "FP32")
    inp.set_data_from_numpy(valid)
    result = client.infer(model, [inp], outputs=[lib.InferRequestedOutput("probs", class_count=2)])
    return [[v.decode() if isinstance(v, bytes) else str(v) for v in row] for row in result.as_numpy("probs")]


def _valid_ok(client, protocol, model, valid) -> bool:
    logits, probs = infer(client, protocol, model, "images", valid, "FP32")
    return probs.shape == (len(valid), logits.shape[1]) and bool(np.isfinite(probs).all())


def _request(model, valid, body_bytes=None):
    header = json.dumps({"inputs": [{"name": "images", "shape": list(valid.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": valid.nbytes}}]}).encode()
    body = header + (valid.tobytes() if body_bytes is None else body_bytes)
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(header) + valid.nbytes}\r\n\r\n")
    return head.encode() + body


def _disconnect_mid_upload(host, port, model, valid):
    """Send the headers and half of the body, then close the connection."""
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(_request(model, valid, valid.tobytes()[: valid.nbytes // 2]))


def _disconnect_before_answer(host, port, model, valid):
    """Send a complete request and close the connection without reading the answer."""
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(_request(model, valid))


if __name__ == "__main__":
    mode, host, http_port, grpc_port, model_name, src, dst = sys.argv[1:8]
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files}
    {"load": load, "faults": faults}[mode](host, {"http": int(http_port), "grpc": int(grpc_port)}, model_name,
                                           arrays, dst)
