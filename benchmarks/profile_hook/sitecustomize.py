"""A sampling profiler for every Python process of a loopback deployment (benchmarks only, never imported by fedshop).

Put this directory first on PYTHONPATH and set FEDSHOP_SAMPLE_DIR: every Python process started with that
environment (SuperLink, SuperExec, ServerApp, SuperNodes, long-lived ClientApps) samples all its threads'
stacks every FEDSHOP_SAMPLE_INTERVAL s (default 0.005) and writes collapsed stacks
(``thread;frame;...;frame count``, one file per process, rewritten every 2 s and at exit) plus whether the
thread was runnable ("R" from /proc) at that moment, so CPU work and waits can be told apart.
`benchmarks/profile_report.py` sums the files. cProfile sees only one thread; these servers are threaded.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections import Counter


def _state(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return "?"


def _start(out_dir: str, interval: float) -> None:
    counts: Counter[str] = Counter()
    me = threading.get_ident()
    name = os.path.basename(sys.argv[0] or "python")
    if name in ("-m", "-c", "python"):
        name = next((a for a in sys.argv[1:] if not a.startswith("-")), name)
    path = os.path.join(out_dir, f"{name.replace('/', '_')}-{os.getpid()}.folded")
    lock = threading.Lock()

    def dump() -> None:
        with lock:
            text = "".join(f"{stack} {n}\n" for stack, n in counts.items())
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def loop() -> None:
        last_dump = time.monotonic()
        while True:
            time.sleep(interval)
            threads = {t.ident: t for t in threading.enumerate()}
            frames = sys._current_frames()
            with lock:
                for ident, frame in frames.items():
                    if ident == me_sampler[0]:
                        continue
                    thread = threads.get(ident)
                    tname = thread.name if thread is not None else "?"
                    native = getattr(thread, "native_id", None) if thread is not None else None
                    state = _state(native) if native else "?"
                    parts = []
                    depth = 0
                    while frame is not None and depth < 60:
                        code = frame.f_code
                        parts.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
                        frame = frame.f_back
                        depth += 1
                    tname = tname.split("(")[0].rstrip("-0123456789_ ") or tname
                    counts[f"{state};{tname};" + ";".join(reversed(parts))] += 1
            if time.monotonic() - last_dump > 2:
                dump()
                last_dump = time.monotonic()

    me_sampler = [0]
    thread = threading.Thread(target=loop, name="fedshop-sampler", daemon=True)
    thread.start()
    me_sampler[0] = thread.ident
    del me
    atexit.register(dump)


if os.environ.get("FEDSHOP_SAMPLE_DIR"):
    os.makedirs(os.environ["FEDSHOP_SAMPLE_DIR"], exist_ok=True)
    _start(os.environ["FEDSHOP_SAMPLE_DIR"], float(os.environ.get("FEDSHOP_SAMPLE_INTERVAL", "0.005")))
