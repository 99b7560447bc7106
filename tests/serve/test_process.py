"""`draftapprox serve` as a user starts it: a process of its own, loading models from folders, under load, and
stopped by SIGTERM."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import tiny_pair_folders

from .conftest import free_port, words


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_pair_folders(root)
    return root


def start(folders, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "draftapprox", "serve", "--target", str(folders / "target"),
                                "--draft", str(folders / "draft"), "--dtype", "float32", "--port", str(port),
                                "--method", "speckv", "--budget", "16", "--set", "window=4", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not come up")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_load_50_requests_from_8_clients_then_sigterm(folders):
    process, url = start(folders)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        sizes: list[int] = []
        methods = ["speckv", "fullkv", "snapkv", "adakv"]

        def ask(i):
            method = methods[i % 4]
            options = {"method": method} if method == "fullkv" else {"method": method, "settings": {"window": 4}}
            out = client.completions.create(model="target", prompt=words(40 + i % 7 * 20, seed=i), max_tokens=8,
                                            temperature=0.7, seed=i, extra_body={"draftapprox": options})
            sizes.append(rss(process.pid))
            return out

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(50)))
        assert all(a.usage.completion_tokens >= 1 for a in answers)
        first, last = sum(sizes[:10]) / 10, sum(sizes[-10:]) / 10
        assert last <= first * 1.05, (first, last)
        # SIGTERM while a request runs: it finishes within the shutdown timeout and the server exits cleanly
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            late = pool.submit(client.completions.create, model="target", prompt=words(30), max_tokens=40,
                               extra_body={"ignore_eos": True})
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            assert late.result().usage.completion_tokens == 40
        # uvicorn re-raises the signal once it has shut down, so the exit status says SIGTERM
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        log = process.stdout.read()
        assert "Traceback" not in log and "serving target with speckv(budget=16, window=4" in log
    finally:
        if process.poll() is None:
            process.kill()
