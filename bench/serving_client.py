"""Closed-loop gRPC load for bench/serving.py, run by the server environment's python (tritonclient lives there).

    python serving_client.py HOST PORT MODEL H W CONCURRENCY[,..] REQUESTS SEED

Each of CONCURRENCY clients sends one preprocessed image per request, waiting for each answer before
the next (closed loop). Prints JSON: per concurrency, images/s and p50/p99 request latency in ms.
"""
import json
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient


def measure(url, model, images, concurrency, requests):
    latencies, lock = [], threading.Lock()
    per_client = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)

    def client(n, offset):
        c = grpcclient.InferenceServerClient(url)
        inp = grpcclient.InferInput("images", list(images[0].shape), "FP32")
        mine = []
        c.infer(model, [_set(inp, images[offset % len(images)])])  # connection set up, not timed
        barrier.wait()
        for i in range(n):
            start = time.perf_counter()
            c.infer(model, [_set(inp, images[(offset + i) % len(images)])])
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n, i)) for i, n in enumerate(per_client)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"concurrency": concurrency, "requests": len(ms), "images_per_s": len(ms) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _set(inp, x):
    inp.set_data_from_numpy(x)
    return inp


if __name__ == "__main__":
    host, port, model, h, w, conc, requests, seed = sys.argv[1:9]
    rng = np.random.default_rng(int(seed))
    images = [rng.standard_normal((1, 3, int(h), int(w))).astype(np.float32) for _ in range(8)]
    print(json.dumps([measure(f"{host}:{port}", model, images, int(c), int(requests)) for c in conc.split(",")]))
