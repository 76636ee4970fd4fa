#!/usr/bin/env python3
"""A bounded load check of `sdfix serve` on loopback (issue 20), run by hand; Python's standard
library only:

    cargo build --release
    python3 scripts/serve_load.py [--binary target/release/sdfix] [--clients 8] [--requests 25]

Starts `sdfix serve --model demo --max-batch 4` on a free port; CLIENTS threads each send
REQUESTS txt2img requests with mixed settings (prompt, sampler, steps, seed), 10% of them
malformed (broken JSON, wrong types, bad sizes, unknown sampler). Checks that every valid
request gets 200 with one 32x32 PNG of the seed it asked for, every malformed one a 4xx in the
JSON error shape, and that no request is lost or answered twice (each seed once). Samples the
server's RSS each second. Then makes the same images with `sdfix generate` (one prompt file,
--batch-size 4) and compares bytes and time: the server's overhead per image. Prints a
Markdown summary for docs/performance.md.
"""

import argparse
import base64
import hashlib
import json
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

PROMPTS = ["solid black background", "solid white background", "a red circle", "a blue square"]
SAMPLERS = [("DDIM", "ddim"), ("Euler a", "euler_a"), ("DPM++ 2M", "dpmpp_2m")]
STEPS = [10, 20]
MALFORMED = [
    b'{"prompt": "x", "steps": ',
    b'{"steps": "twenty"}',
    b'{"width": 30, "height": 32}',
    b'{"sampler_name": "LMS"}',
    b'[1, 2, 3]',
    b'{"cfg_scale": -3}',
]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def post(url, body):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/sdfix")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--seed", type=int, default=20)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    binary = os.path.abspath(args.binary)
    work = tempfile.mkdtemp(prefix="sdfix-load-")

    # The plan, fixed up front: every valid request has its own seed.
    plan = []
    for client in range(args.clients):
        for k in range(args.requests):
            seed = client * 1000 + k
            if rng.random() < 0.1:
                plan.append((client, seed, None, rng.choice(MALFORMED)))
            else:
                settings = {"prompt": rng.choice(PROMPTS), "seed": seed, "steps": rng.choice(STEPS),
                            "sampler_name": rng.choice(SAMPLERS)[0]}
                plan.append((client, seed, settings, json.dumps(settings).encode()))

    server = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--max-batch", "4",
                               "--queue", str(args.clients)],
                              stdout=subprocess.PIPE, text=True, cwd=work)
    address = server.stdout.readline().split("http://")[1].split()[0]
    url = f"http://{address}/sdapi/v1/txt2img"
    rss = []
    done = threading.Event()

    def sample_rss():
        start = time.time()
        while not done.is_set():
            rss.append((time.time() - start, rss_kib(server.pid)))
            time.sleep(1)

    results = []  # (seed, settings, status, body, seconds)
    lock = threading.Lock()

    def client(index):
        for (c, seed, settings, body) in plan:
            if c != index:
                continue
            started = time.time()
            status, answer = post(url, body)
            with lock:
                results.append((seed, settings, status, answer, time.time() - started))

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    started = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - started
    done.set()
    sampler.join()
    server.terminate()
    server.wait()

    failures = []
    latencies = []
    server_png = {}
    answered = {}
    for seed, settings, status, answer, seconds in results:
        answered[seed] = answered.get(seed, 0) + 1
        if settings is None:
            error = json.loads(answer) if answer.startswith(b"{") else {}
            if not (400 <= status < 500 and "error" in error and "detail" in error):
                failures.append(f"malformed seed {seed}: {status} {answer[:200]!r}")
            continue
        if status != 200:
            failures.append(f"seed {seed}: {status} {answer[:200]!r}")
            continue
        body = json.loads(answer)
        info = json.loads(body["info"])
        png = base64.b64decode(body["images"][0])
        size = (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))
        if len(body["images"]) != 1 or info["all_seeds"] != [seed] or size != (32, 32):
            failures.append(f"seed {seed}: {len(body['images'])} images, seeds {info['all_seeds']}, {size}")
        server_png[seed] = png
        latencies.append(seconds)
    lost = [seed for (_, seed, _, _) in plan if answered.get(seed, 0) != 1]
    if lost:
        failures.append(f"lost or answered twice: {lost}")

    # The same images from `generate`, batched the same way.
    valid = [(seed, settings) for (_, seed, settings, _) in plan if settings is not None]
    sampler_name = dict(SAMPLERS)
    with open(os.path.join(work, "prompts.jsonl"), "w") as prompts:
        for seed, s in valid:
            prompts.write(json.dumps({"prompt": s["prompt"], "seed": seed, "steps": s["steps"],
                                      "sampler": sampler_name[s["sampler_name"]]}) + "\n")
    g_started = time.time()
    subprocess.run([binary, "generate", "--prompts", "prompts.jsonl", "--batch-size", "4", "--quiet",
                    "--out-dir", "generate"], cwd=work, check=True)
    g_wall = time.time() - g_started
    same = 0
    for seed, s in valid:
        names = [n for n in os.listdir(os.path.join(work, "generate")) if f"-00-{seed}-" in n]
        if names and seed in server_png:
            with open(os.path.join(work, "generate", names[0]), "rb") as f:
                same += f.read() == server_png[seed]

    first_minute = [k for (t, k) in rss if t >= 60] or [k for (_, k) in rss]
    print(f"| requests | {len(plan)} ({len(valid)} valid, {len(plan) - len(valid)} malformed), "
          f"{args.clients} clients x {args.requests} |")
    print(f"| failures | {len(failures)} |")
    print(f"| latency p50 / p95 (valid) | {statistics.median(latencies):.2f} s / {percentile(latencies, 95):.2f} s |")
    print(f"| server wall, images/s | {wall:.1f} s, {len(latencies) / wall:.2f} images/s |")
    print(f"| generate, same images (--batch-size 4) | {g_wall:.1f} s, {len(valid) / g_wall:.2f} images/s |")
    print(f"| server overhead per image | {(wall - g_wall) / len(valid) * 1000:.0f} ms |")
    print(f"| PNG bytes equal to generate's | {same} of {len(valid)} |")
    print(f"| server RSS: start, max, end (KiB) | {rss[0][1]}, {max(k for _, k in rss)}, {rss[-1][1]} |")
    print(f"| RSS after the first minute: min, max (KiB) | {min(first_minute)}, {max(first_minute)} |")
    for failure in failures[:20]:
        print("FAIL", failure)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
