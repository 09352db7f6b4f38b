"""`localmix serve` as a user runs it: in a child process, the one ready line on stdout, one request,
Ctrl-C; and the refusals that come before anything listens (each one line, status 1)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import openai

from tests.support.cli import one_line_error, run_cli

READY = re.compile(r"^serving (\S+) at (http://127\.0\.0\.1:\d+/v1) · .*predicted")


def test_serve_answers_and_ctrl_c_exits_0(smol):
    env = {**os.environ, "LOCALMIX_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "localmix", "serve", str(smol), "--port", "0", "--vram", "0", "--threads", "2",
                             "--log-requests"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # the load takes seconds; a broken start ends stdout (and the test) at once
        ready = READY.match(line)
        assert ready, (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        name, url = ready.groups()
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi!"}], max_tokens=8)
        assert reply.choices[0].message.content.strip()
        stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Tell me a long story."}],
                                                max_tokens=2000, stream=True)
        next(stream)  # a generation is running when Ctrl-C comes
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert time.perf_counter() - t0 < 15
        assert "Traceback" not in err and out == ""  # stdout: the ready line only
        assert '"POST /v1/chat/completions HTTP/1.1" 200' in err  # --log-requests: on stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_off_loopback_needs_an_api_key(smol):
    r = run_cli("serve", str(smol), "--host", "0.0.0.0", "--port", "0", "--vram", "0", env={"LOCALMIX_API_KEY": ""})
    assert one_line_error(r, "--api-key"), r.stderr
    assert r.stdout == ""


def test_a_port_in_use_is_one_line(smol):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = run_cli("serve", str(smol), "--port", str(port), "--vram", "0")
    assert one_line_error(r, f"127.0.0.1:{port}"), r.stderr


def test_tools_with_side_effects_are_refused(smol, tmp_path):
    tools = tmp_path / "tools.py"
    tools.write_text("from localmix.tools import tool\n\n"
                     "@tool(side_effects=True)\ndef delete_file(path: str) -> str:\n    'Delete a file.'\n    return path\n")
    r = run_cli("serve", str(smol), "--port", "0", "--vram", "0", "--tools", str(tools))
    assert one_line_error(r, "delete_file has side effects"), r.stderr


def test_missing_extra_names_it(tmp_path):
    code = ("import sys; sys.modules['uvicorn'] = None\n"  # as if it were not installed
            "from localmix.cli import main\nsys.exit(main(['serve']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert one_line_error(r, "pip install 'localmix[serve]'"), r.stderr
