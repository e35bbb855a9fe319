"""Load test for `cosyjax serve` (loopback only; bounded in request count and time).

    python bench/load_test.py                       # spawns `cosyjax serve --demo --warmup` on a free port
    python bench/load_test.py --url http://127.0.0.1:8000 --server-pid 1234
    python bench/load_test.py --soak 300            # 5-minute closed loop at concurrency 8

Closed loop: at each concurrency c (default 1,4,8,16), c workers send requests back to back until
`--requests` requests (default max(8, 2c)) are done or `--max-seconds` pass. Open loop: requests start
at a fixed `--rate` per second (`--open-requests` of them) whatever the server's speed. Modes: `batch`
(non-streaming WAV: joins the server's batches) and `stream` (streaming PCM). For each run it prints
requests/s, audio seconds per second, time to first audio p50/p95/p99, errors (by status), and the
server's resident memory before/after and the CPU cores it kept busy (CPU seconds / wall: on a CPU-only
machine, a server already near its core count at concurrency 1 has little for batching to gain). Also printed: the two issue-12 ratios, 8 concurrent vs 8
sequential non-streaming requests (wall time) and 8 streams vs 1 (audio seconds per second).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse

import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RATE = 24000


def rss_mb(pid) -> float:
    """Resident memory of `pid` in MiB (Linux /proc), NaN if unknown."""
    if not pid:
        return float("nan")
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid) -> float:
    """User + system CPU seconds `pid` has used, all threads (Linux /proc), NaN if unknown."""
    if not pid:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return float("nan")


def audio_seconds(nbytes: int, fmt: str) -> float:
    if fmt == "pcm":
        return nbytes / 2 / RATE
    return max(nbytes - 44, 0) / 4 / RATE  # float32 WAV (44-byte header)


async def one_request(client, url, body, fmt):
    t0 = time.perf_counter()
    first, n = None, 0
    try:
        async with client.stream("POST", url, json=body) as r:
            async for part in r.aiter_bytes():
                if part and first is None:
                    first = time.perf_counter() - t0
                n += len(part)
            status = r.status_code
    except Exception as e:  # the load test counts transport failures as errors; it never hides them
        return {"status": f"transport:{type(e).__name__}", "ttfa": None, "seconds": time.perf_counter() - t0,
                "audio": 0.0}
    return {"status": status, "ttfa": first, "seconds": time.perf_counter() - t0,
            "audio": audio_seconds(n, fmt) if status == 200 else 0.0}


def body_for(args, mode, i):
    fmt = "pcm" if mode == "stream" else "wav"
    return {"model": "tts-1", "voice": args.voice, "input": args.text, "response_format": fmt,
            "stream": mode == "stream", "seed": i}, fmt


async def closed_loop(args, mode, concurrency, n_requests, max_seconds):
    import httpx

    url = args.url + "/v1/audio/speech"
    results, counter = [], [0]
    deadline = time.perf_counter() + max_seconds
    async with httpx.AsyncClient(timeout=args.timeout, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        async def worker():
            while counter[0] < n_requests and time.perf_counter() < deadline:
                i = counter[0]
                counter[0] += 1
                body, fmt = body_for(args, mode, i)
                results.append(await one_request(c, url, body, fmt))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return results, wall


async def open_loop(args, mode, rate, n_requests):
    import httpx

    url = args.url + "/v1/audio/speech"
    async with httpx.AsyncClient(timeout=args.timeout, limits=httpx.Limits(max_connections=n_requests + 4)) as c:
        t0 = time.perf_counter()
        tasks = []
        for i in range(n_requests):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            body, fmt = body_for(args, mode, i)
            tasks.append(asyncio.create_task(one_request(c, url, body, fmt)))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return list(results), wall


def summarize(label, results, wall, rss_before, rss_after, cpu=float("nan")):
    ok = [r for r in results if r["status"] == 200]
    errors = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    ttfa = np.array([r["ttfa"] for r in ok if r["ttfa"] is not None])
    pct = (lambda q: float(np.percentile(ttfa, q)) if ttfa.size else float("nan"))  # noqa: E731
    audio = sum(r["audio"] for r in ok)
    row = {"run": label, "requests": len(results), "ok": len(ok), "wall_s": wall, "req_per_s": len(ok) / wall,
           "audio_s_per_s": audio / wall, "ttfa_p50": pct(50), "ttfa_p95": pct(95), "ttfa_p99": pct(99),
           "errors": errors, "rss_before_mb": rss_before, "rss_after_mb": rss_after, "server_cores": cpu / wall}
    print(f"{label:<24} {len(results):>4} {len(ok):>4} {wall:>8.2f} {row['req_per_s']:>7.3f} {row['audio_s_per_s']:>8.3f}"
          f" {row['ttfa_p50']:>7.2f} {row['ttfa_p95']:>7.2f} {row['ttfa_p99']:>7.2f} {rss_before:>8.0f} {rss_after:>8.0f}"
          f" {row['server_cores']:>6.2f}  {json.dumps(errors) if errors else '-'}", flush=True)
    return row


HEADER = (f"{'run':<24} {'reqs':>4} {'ok':>4} {'wall_s':>8} {'req/s':>7} {'audio/s':>8} {'ttfa50':>7} {'ttfa95':>7}"
          f" {'ttfa99':>7} {'rss0_MB':>8} {'rss1_MB':>8} {'cores':>6}  errors")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def spawn_server(args):
    port = free_port()
    cmd = [sys.executable, "-m", "cosyjax", "serve", "--demo", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.max_batch), "--log-level", "warning",
           "--voices-dir", os.path.join(args.workdir, "voices")]
    cmd += ["--warmup"] if not args.no_warmup else []
    cmd += ["--stream-slots", str(args.stream_slots), "--stream-batching", args.stream_batching]
    cmd += ["--malloc-trim-s", str(args.malloc_trim_s)]
    log = open(os.path.join(args.workdir, "server.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    t0 = time.time()
    while time.time() - t0 < args.startup_timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit(f"server did not answer /health within {args.startup_timeout} s; see {log.name}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server on loopback (default: spawn one on the demo folder)")
    p.add_argument("--server-pid", type=int, help="pid of --url's server (for its memory)")
    p.add_argument("--voice", default="demo")
    p.add_argument("--text", default="Hello.", help="short: the tiny demo LLM never stops (max 20x text tokens)")
    p.add_argument("--modes", default="batch,stream")
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=None, help="requests per closed-loop run (default max(8, 2c))")
    p.add_argument("--max-seconds", type=float, default=240.0, help="time bound of one run")
    p.add_argument("--rate", type=float, default=2.0, help="open loop: requests started per second")
    p.add_argument("--open-requests", type=int, default=16)
    p.add_argument("--soak", type=float, default=0.0, help="seconds of closed loop at concurrency 8 (soak)")
    p.add_argument("--soak-mode", default="batch,stream", help="modes alternated in the soak")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--stream-slots", type=int, default=8)
    p.add_argument("--stream-batching", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--malloc-trim-s", type=float, default=10.0, help="spawned server's --malloc-trim-s (0: never)")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--startup-timeout", type=float, default=1500.0)
    p.add_argument("--workdir", default="/tmp/cosyjax_load_test")
    p.add_argument("--json", help="write all rows to this file")
    args = p.parse_args(argv)

    os.makedirs(args.workdir, exist_ok=True)
    proc = None
    if args.url:
        host = urllib.parse.urlparse(args.url).hostname
        if host not in LOOPBACK:
            raise SystemExit(f"--url must be on loopback ({', '.join(sorted(LOOPBACK))}), got {host}")
        pid = args.server_pid
    else:
        print("starting the server (demo folder, warm-up compiles every batch bucket) ...", file=sys.stderr)
        proc, args.url = spawn_server(args)
        pid = proc.pid
    rows = []
    try:
        print(HEADER)
        if args.soak > 0:
            modes = args.soak_mode.split(",")
            before = rss_mb(pid)
            t_end = time.perf_counter() + args.soak
            k = 0
            while time.perf_counter() < t_end:
                mode = modes[k % len(modes)]
                k += 1
                r0, c0 = rss_mb(pid), cpu_seconds(pid)
                res, wall = asyncio.run(closed_loop(args, mode, 8, 16, max(1.0, t_end - time.perf_counter())))
                rows.append(summarize(f"soak c=8 {mode} #{k}", res, wall, r0, rss_mb(pid), cpu_seconds(pid) - c0))
            after = rss_mb(pid)
            n5 = sum(v for r in rows for s, v in r["errors"].items() if s.startswith("5"))
            nerr = sum(v for r in rows for v in r["errors"].values())
            total = sum(r["requests"] for r in rows)
            print(f"soak: {args.soak:.0f} s, {total} requests, {nerr} errors, {n5} 5xx; server RSS {before:.0f} -> "
                  f"{after:.0f} MiB ({100.0 * (after - before) / before:+.1f} %)")
        else:
            for mode in args.modes.split(","):
                for c in [int(x) for x in args.concurrency.split(",")]:
                    n = args.requests or max(8, 2 * c)
                    r0, c0 = rss_mb(pid), cpu_seconds(pid)
                    res, wall = asyncio.run(closed_loop(args, mode, c, n, args.max_seconds))
                    rows.append(summarize(f"closed c={c} {mode}", res, wall, r0, rss_mb(pid), cpu_seconds(pid) - c0))
                r0, c0 = rss_mb(pid), cpu_seconds(pid)
                res, wall = asyncio.run(open_loop(args, mode, args.rate, args.open_requests))
                rows.append(summarize(f"open {args.rate:g}/s {mode}", res, wall, r0, rss_mb(pid), cpu_seconds(pid) - c0))
            by = {r["run"]: r for r in rows}
            seq, par = by.get("closed c=1 batch"), by.get("closed c=8 batch")
            if seq and par and seq["ok"] and par["ok"]:
                t_seq = seq["wall_s"] / seq["ok"] * 8  # 8 sequential requests
                t_par = par["wall_s"] / par["ok"] * 8  # 8 requests with 8 in flight
                print(f"non-streaming: 8 concurrent / 8 sequential wall time = {t_par / t_seq:.3f} (target <= 0.5)")
            s1, s8 = by.get("closed c=1 stream"), by.get("closed c=8 stream")
            if s1 and s8 and s1["audio_s_per_s"] > 0:
                print(f"streaming: audio s/s at 8 streams / 1 stream = {s8['audio_s_per_s'] / s1['audio_s_per_s']:.2f}"
                      " (target >= 3)")
        import httpx

        try:  # failures after a 200 (mid-stream) only the server sees
            m = httpx.get(args.url + "/metrics", timeout=10).text
            errs = [ln for ln in m.splitlines() if ln.startswith("cosyjax_stream_errors_total")]
            print("server-side:", errs[0] if errs else "no stream error counter",
                  "|", " ".join(ln for ln in m.splitlines() if ln.startswith('cosyjax_requests_total') and 'status="5' in ln)
                  or "no 5xx counted")
        except httpx.HTTPError as e:
            print(f"could not read /metrics: {e}")
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
