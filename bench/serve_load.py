"""Load test: N concurrent streaming requests against a locally started `longctx serve`.

    python bench/serve_load.py                       # 50 streaming requests, tiny random checkpoint
    python bench/serve_load.py --requests 50 --max-tokens 64 --ckpt runs/tiny

Checks that every request completes (ends with `data: [DONE]`, a finish_reason, no error event) and that the
server still answers /health afterwards. Prints latency percentiles, time to first token and throughput, and
compares with the same requests sent one at a time (the baseline: batching should beat it). With
`--hostile N` (default 50), N malformed requests (NaN and huge numbers, lone surrogates, nesting bombs,
bad types, oversized bodies) go out at the same time as the valid streams: every one must get a 4xx,
none a 5xx, and no valid request may fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(root: Path) -> Path:
    import torch

    from longctx import GPT, GPTConfig
    from longctx.checkpoint import save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(root / "tiny", GPT(GPTConfig.from_preset("tiny", init_std=0.3)))


async def one_stream(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict:
    body = {
        "prompt": f"Request {i}: once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": i,
        "stream": True,
    }
    t0 = time.perf_counter()
    first, pieces, done, reason, error = None, 0, False, None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}: {await r.aread()}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                error = obj["error"]
                continue
            choice = obj["choices"][0]
            if choice["text"]:
                pieces += 1
                first = first or time.perf_counter() - t0
            reason = choice["finish_reason"] or reason
    total = time.perf_counter() - t0
    ok = done and reason in ("stop", "length") and error is None
    return {"ok": ok, "latency": total, "ttft": first or total, "pieces": pieces, "error": error}


def _bad(field: str, raw: str) -> bytes:
    return (
        b'{"prompt": "Hi", "max_tokens": 4, "stream": true, "' + field.encode() + b'": ' + raw.encode() + b"}"
    )


HOSTILE = [
    _bad("temperature", "NaN"), _bad("top_p", "NaN"), _bad("repetition_penalty", "Infinity"),
    _bad("temperature", "1" + "0" * 400), _bad("seed", str(2**64)), _bad("seed", str(-(2**70))),
    _bad("max_tokens", "9" * 5000), _bad("prompt", '"ab\\ud800cd"'), _bad("stop", "[1]"), _bad("n", "2"),
    b"[" * 100_000, b'{"prompt": "x"', b"\xff\xfe", b'{"prompt": "' + b"x" * (9 * 2**20) + b'"}',
]  # fmt: skip


async def one_hostile(client: httpx.AsyncClient, url: str, i: int) -> int:
    body = HOSTILE[i % len(HOSTILE)]
    r = await client.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    return r.status_code


async def load(url: str, n: int, max_tokens: int, concurrent: bool, hostile: int = 0):
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        t0 = time.perf_counter()
        if concurrent:
            streams = [one_stream(client, url, i, max_tokens) for i in range(n)]
            bad = [one_hostile(client, url, i) for i in range(hostile)]
            out = await asyncio.gather(*streams, *bad)
            results, codes = list(out[:n]), list(out[n:])
        else:
            results, codes = [await one_stream(client, url, i, max_tokens) for i in range(n)], []
        return results, codes, time.perf_counter() - t0


def report(name: str, results: list[dict], wall: float) -> None:
    ok = [r for r in results if r["ok"]]
    lat = sorted(r["latency"] for r in ok) or [float("nan")]
    ttft = sorted(r["ttft"] for r in ok) or [float("nan")]
    pieces = sum(r["pieces"] for r in ok)
    print(
        f"{name:<12}{len(ok):>4}/{len(results):<4}{wall:>8.1f}s{pieces / wall:>10.1f}"
        f"{statistics.median(lat):>9.2f}s{lat[int(0.95 * (len(lat) - 1))]:>9.2f}s{statistics.median(ttft):>9.2f}s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="checkpoint to serve (default: a random tiny one)")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--baseline", type=int, default=10, help="requests sent one at a time (0 = skip)")
    p.add_argument("--hostile", type=int, default=50, help="malformed requests sent alongside (0 = none)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        ckpt = args.ckpt or str(tiny_checkpoint(Path(tmp)))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "longctx",
                "serve",
                ckpt,
                "--port",
                str(port),
                "--max-queue",
                str(max(64, args.requests)),
                "--log-level",
                "warning",
            ]
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    httpx.get(url + "/health", timeout=2.0)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.2)
            print(
                f"{'run':<12}{'ok':>9}{'wall':>9}{'pieces/s':>10}{'p50 lat':>10}{'p95 lat':>10}{'p50 ttft':>10}"
            )
            results, codes, wall = asyncio.run(
                load(url, args.requests, args.max_tokens, concurrent=True, hostile=args.hostile)
            )
            report(f"{args.requests} concurrent", results, wall)
            if codes:
                tally = {c: codes.count(c) for c in sorted(set(codes))}
                print(f"{len(codes)} hostile requests at the same time: status codes {tally}")
            if args.baseline:
                base, _, base_wall = asyncio.run(load(url, args.baseline, args.max_tokens, concurrent=False))
                report(f"{args.baseline} one by one", base, base_wall)
                per_req = base_wall / args.baseline
                print(
                    f"throughput: {args.requests / wall:.2f} req/s concurrent vs {1 / per_req:.2f} req/s one by "
                    f"one ({(args.requests / wall) * per_req:.2f}x)"
                )
            health = httpx.get(url + "/health", timeout=10.0).json()
            alive = server.poll() is None and health["status"] == "ok" and health["in_flight"] == 0
            failed = [r.get("error") for r in results if not r["ok"]]
            five = [c for c in codes if c >= 500]
            not4xx = [c for c in codes if not 400 <= c < 500]
            print(
                f"all {args.requests} valid completed: {not failed} ({len(failed)} failed); hostile: "
                f"{len(five)} got a 5xx, {len(not4xx)} not a 4xx; server up and idle afterwards: {alive}"
            )
            if failed or not alive or not4xx:
                raise SystemExit(f"FAILED: {failed[:3]} {not4xx[:3]}")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
