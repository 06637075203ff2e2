"""Load `savpack-run serve` on loopback: throughput and p50/p95/p99 latency at several concurrency levels, with batching
on and off, every status counted, and the server's RSS after 1,000 and 10,000 requests of each level.

    python tools/load_serve.py [--bundle exported/bundles/qwen2/bundle] [--items ITEMS.jsonl] [--requests 10000]
                               [--levels 1,8,32,128] [--max-batch 32] [--max-wait-ms 5] [--out FILE.json]

For each mode (batched: --max-batch N; unbatched: --max-batch 1) one server process is started (port 0, no access
log) and all levels run against it in turn, each `--requests` requests of one item each, cycling through the items
(text and images from a JSONL file as `savpack-run classify` reads it; images sent as base64). A level runs `level`
clients, each on its own HTTP/1.1 keep-alive connection, sending its next request when the last one is answered. Every request is bounded (--timeout) and so is
each level (--level-seconds): an unfinished level is reported as such, never waited on forever.

The server and this client share the machine's cores: compare ratios measured in one run, not absolute figures.
Acceptance (issue 16): no status other than 2xx or 429; throughput at concurrency 32 batched >= 3x concurrency 1;
RSS after 10,000 requests within 10% of RSS after 1,000 (per level).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from measure import machine_description, rss, write_results

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / "exported" / "bundles" / "qwen2" / "bundle"
RSS_AT = (1_000, 10_000)


def read_payloads(items: Path) -> list[bytes]:
    """One JSON request body per item of the file, images inlined as base64."""
    from savpack_runtime.items import read_items

    bodies = []
    for _, item in read_items(items):
        images = [base64.b64encode(Path(path).read_bytes()).decode("ascii") for path in item["images"]]
        bodies.append(json.dumps({"inputs": [{"text": item["text"], **({"images": images} if images else {})}]}).encode())
    return bodies


class Server:
    """`savpack-run serve` in a child process on 127.0.0.1, port 0; the address is read from its first line."""

    def __init__(self, bundle: Path, max_batch: int, max_wait_ms: float, max_queue: int, threads: int | None, start_seconds: float):
        command = [sys.executable, "-m", "savpack_runtime.cli", "serve", str(bundle), "--host", "127.0.0.1", "--port", "0",
                   "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", str(max_queue), "--max-inputs", "1",
                   "--no-access-log", "--log-level", "warning"]
        if threads:
            command += ["--threads", str(threads)]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + start_seconds
        line = ""
        while time.monotonic() < deadline and self.process.poll() is None:
            line = self.process.stderr.readline()
            match = re.search(r"on (http://\S+?)/ ", line)
            if match:
                self.url = match.group(1)
                break
        else:
            self.stop()
            raise SystemExit(f"the server did not start within {start_seconds} s: {line.strip()}")
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise SystemExit(f"{self.url}/health did not answer 200 within {start_seconds} s")

    def rss(self) -> int:
        return rss("VmRSS", self.process.pid)

    def batch_stats(self) -> tuple[float, float]:
        """(batches, items) so far, from /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = dict(re.findall(r"^savpack_batch_items_(count|sum) (\S+)$", text, re.MULTILINE))
        return float(values.get("count", 0)), float(values.get("sum", 0))

    def stop(self) -> int | None:
        """SIGTERM (the server drains), then wait; kill only if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Connection:
    """A minimal HTTP/1.1 keep-alive client for POSTs to the server (Content-Length bodies only): much less client
    CPU per request than a general client, so the server, not this tool, is what the numbers measure."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host.strip("[]"), int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode("ascii") + body)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        fields = dict(line.split(":", 1) for line in head[1:] if ":" in line)
        fields = {name.strip().lower(): value.strip() for name, value in fields.items()}
        if "content-length" not in fields:
            raise ValueError(f"response without Content-Length: {head[0]}")
        content = await self.reader.readexactly(int(fields["content-length"]))
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, content

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


async def run_level(server: Server, payloads: list[bytes], concurrency: int, total: int, timeout: float, level_seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    rss_after: dict[str, int] = {}
    next_index = 0
    done = 0

    async def client(stop_at: float) -> None:
        nonlocal next_index, done
        connection = Connection(server.url)
        try:
            while next_index < total and time.monotonic() < stop_at:
                body = payloads[next_index % len(payloads)]
                next_index += 1
                started = time.perf_counter()
                try:
                    status, _ = await asyncio.wait_for(connection.post("/v1/classify", body), timeout)
                    latencies.append(time.perf_counter() - started)
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    await connection.close()
                done += 1
                if done in RSS_AT:
                    rss_after[str(done)] = server.rss()
        finally:
            await connection.close()

    batches_before, items_before = server.batch_stats()
    started = time.perf_counter()
    stop_at = time.monotonic() + level_seconds
    await asyncio.gather(*(client(stop_at) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    batches_after, items_after = server.batch_stats()
    ordered = sorted(latencies)

    def percentile(share: float) -> float | None:
        return round(1000 * ordered[min(len(ordered) - 1, int(share * len(ordered)))], 3) if ordered else None

    ok = sum(count for status, count in statuses.items() if status.startswith("2"))
    batches = batches_after - batches_before
    return {
        "concurrency": concurrency, "requests": done, "finished": done == total, "seconds": round(seconds, 3),
        "throughput_rps": round(ok / seconds, 2) if seconds else 0.0,
        "statuses": statuses, "ok": ok, "rejected_429": statuses.get("429", 0),
        "unexpected": sum(count for status, count in statuses.items() if not status.startswith("2") and status != "429")
        + sum(errors.values()),
        "errors": errors,
        "p50_ms": percentile(0.50), "p95_ms": percentile(0.95), "p99_ms": percentile(0.99),
        "mean_ms": round(1000 * statistics.fmean(ordered), 3) if ordered else None,
        "mean_batch_items": round((items_after - items_before) / batches, 2) if batches else None,
        "rss_after": rss_after,
        "rss_growth": round(rss_after[str(RSS_AT[1])] / rss_after[str(RSS_AT[0])] - 1, 4)
        if all(str(at) in rss_after for at in RSS_AT) else None,
        "rss_end": server.rss(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle folder (default: the golden qwen2 text bundle)")
    parser.add_argument("--items", type=Path, default=None, help="JSONL items to send (default: items.jsonl beside the bundle folder)")
    parser.add_argument("--requests", type=int, default=10_000, help="requests per level (default 10000)")
    parser.add_argument("--levels", default="1,8,32,128", help="concurrency levels (default 1,8,32,128)")
    parser.add_argument("--modes", default="batched,unbatched", help="batched (--max-batch N), unbatched (--max-batch 1), or both")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="the server's onnxruntime threads (default: all cores)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    parser.add_argument("--level-seconds", type=float, default=900.0, help="seconds per level at most (default 900)")
    parser.add_argument("--start-seconds", type=float, default=120.0, help="seconds for a server to start (default 120)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    args.levels = [int(level) for level in args.levels.split(",")]
    args.modes = args.modes.split(",")
    if args.requests < 1 or any(level < 1 for level in args.levels) or set(args.modes) - {"batched", "unbatched"}:
        parser.error("--requests and --levels must be >= 1; --modes holds batched and/or unbatched")
    args.items = args.items or args.bundle.parent / "items.jsonl"
    return args


def run(args: argparse.Namespace) -> dict:
    """Every mode's server, every level against it; the machine's load average before anything ran."""
    payloads = read_payloads(args.items)
    load_average = os.getloadavg()
    runs = {}
    for mode in args.modes:
        max_batch = args.max_batch if mode == "batched" else 1
        server = Server(args.bundle, max_batch, args.max_wait_ms, args.max_queue, args.threads, args.start_seconds)
        try:
            runs[mode] = {"max_batch": max_batch, "rss_start": server.rss(), "levels": []}
            for level in args.levels:
                result = asyncio.run(run_level(server, payloads, level, args.requests, args.timeout, args.level_seconds))
                runs[mode]["levels"].append(result)
                print(f"{mode:>9} c={level:<4} {result['requests']:>6} requests {result['throughput_rps']:>8.1f}/s "
                      f"p50 {result['p50_ms']} ms  unexpected {result['unexpected']}", file=sys.stderr, flush=True)
        finally:
            runs[mode]["exit_code"] = server.stop()
    return {
        "tool": "tools/load_serve.py", "bundle": str(args.bundle), "items": str(args.items), "requests_per_level": args.requests,
        "levels": args.levels, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "max_queue": args.max_queue,
        "threads": args.threads, "machine": machine_description(), "load_average_at_start": load_average, "runs": runs,
    }


def check(report: dict) -> None:
    """The ratios and the acceptance checks of issue 16, added to the report."""
    runs = report["runs"]

    def throughput(mode: str, level: int) -> float | None:
        found = [entry for entry in runs.get(mode, {}).get("levels", []) if entry["concurrency"] == level]
        return found[0]["throughput_rps"] if found else None

    ratios, checks = {}, {}
    if throughput("batched", 32) and throughput("batched", 1):
        ratios["batched_c32_over_batched_c1"] = round(throughput("batched", 32) / throughput("batched", 1), 2)
        checks["c32_batched_at_least_3x_c1"] = ratios["batched_c32_over_batched_c1"] >= 3
    if throughput("batched", 32) and throughput("unbatched", 1):
        ratios["batched_c32_over_unbatched_c1"] = round(throughput("batched", 32) / throughput("unbatched", 1), 2)
    for level in report["levels"]:
        if throughput("batched", level) and throughput("unbatched", level):
            ratios[f"batched_over_unbatched_c{level}"] = round(throughput("batched", level) / throughput("unbatched", level), 2)
    every_level = [level for run in runs.values() for level in run["levels"]]
    checks["only_2xx_or_429"] = all(level["unexpected"] == 0 for level in every_level)
    checks["all_levels_finished"] = all(level["finished"] for level in every_level)
    growths = [level["rss_growth"] for level in every_level if level["rss_growth"] is not None]
    if growths:
        checks["rss_growth_within_10_percent"] = all(abs(growth) <= 0.10 for growth in growths)
    report["ratios"], report["checks"] = ratios, checks


def print_table(report: dict) -> None:
    table = [("mode", "conc.", "requests", "2xx", "429", "other", "req/s", "p50 ms", "p95 ms", "p99 ms", "batch",
              "RSS@1k MB", "RSS@10k MB", "growth")]
    for mode, run in report["runs"].items():
        for level in run["levels"]:
            rss_after = level["rss_after"]
            table.append((mode, level["concurrency"], level["requests"], level["ok"], level["rejected_429"], level["unexpected"],
                          f"{level['throughput_rps']:.1f}", level["p50_ms"], level["p95_ms"], level["p99_ms"], level["mean_batch_items"],
                          *(f"{rss_after[str(at)] / 2**20:.1f}" if str(at) in rss_after else "-" for at in RSS_AT),
                          f"{100 * level['rss_growth']:+.1f}%" if level["rss_growth"] is not None else "-"))
    widths = [max(len(str(row[column])) for row in table) for column in range(len(table[0]))]
    for row in table:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))
    for name, value in report["ratios"].items():
        print(f"{name}: {value}x")
    for name, passed in report["checks"].items():
        print(f"{name}: {'yes' if passed else 'NO'}")


def main() -> int:
    args = parse_args()
    report = run(args)
    check(report)
    print_table(report)
    if args.out:
        print(f"wrote {write_results(args.out, report)}")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
