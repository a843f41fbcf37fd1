"""Closed-loop load for nearl_rt/bench/serving.py: closed_loop (also used in-process there) and, run by the server
environment's python (tritonclient lives there), gRPC clients of export.serve.

    python serving_client.py HOST PORT MODEL H W CONCURRENCY[,..] REQUESTS SEED

Each of CONCURRENCY clients sends one preprocessed image per request, waiting for each answer before
the next (closed loop). Prints JSON: per concurrency, images/s and p50/p99 request latency in ms.
"""
import json
import sys
import threading
import time

import numpy as np


def closed_loop(make_client, concurrency: int, requests: int) -> dict:
    """`concurrency` threads, each `call = make_client(k)` (set-up, not timed) then `call(i)` for its share
    of `requests`, waiting for each answer before the next. Images/s over the wall time, p50/p99 in ms."""
    latencies, lock = [], threading.Lock()
    per_client = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)

    def client(k, n):
        call, mine = make_client(k), []
        barrier.wait()
        for i in range(n):
            start = time.perf_counter()
            call(i)
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k, n)) for k, n in enumerate(per_client)]
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


def grpc_client(url, model, images):
    """make_client for closed_loop: one gRPC connection per client, one image per request."""
    import tritonclient.grpc as grpcclient

    def make_client(k):
        c = grpcclient.InferenceServerClient(url)
        inp = grpcclient.InferInput("images", list(images[0].shape), "FP32")

        def call(i):
            inp.set_data_from_numpy(images[(k + i) % len(images)])
            c.infer(model, [inp])
        call(0)  # connection set up, not timed
        return call
    return make_client


if __name__ == "__main__":
    host, port, model, h, w, conc, requests, seed = sys.argv[1:9]
    rng = np.random.default_rng(int(seed))
    images = [rng.standard_normal((1, 3, int(h), int(w))).astype(np.float32) for _ in range(8)]
    make_client = grpc_client(f"{host}:{port}", model, images)
    print(json.dumps([closed_loop(make_client, int(c), int(requests)) for c in conc.split(",")]))
