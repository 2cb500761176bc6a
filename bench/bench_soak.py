"""Memory of one `dermgate serve` process (every role) through a burst of images and a soak.

    python -m bench.bench_soak [--n 200] [--soak 0] [--rounds 10]

The service runs in its own process with SCP, worker, dispatcher and API, on
SQLite, delivering to the loopback FHIR server and to Orthanc (``--no-pacs``:
FHIR only, e.g. for a long soak: every image leaves about 1.3 MB in the PACS).

How it is measured: the resident set size (``VmRSS``) of that one process, read
from ``/proc/<pid>/status`` every 0.25 s by this bench process, and the kernel's
high-water mark of it (``VmHWM``) for the peak; children (none) and the peers are
not counted. Reported: RSS when ready (model loaded), the peak during the burst
of ``--n`` images (one storescu association, as fast as it sends), RSS once the
burst is delivered; then, for ``--soak`` images sent in ``--rounds`` equal rounds
(each round delivered before the next), RSS after each round and the drift
between the first round and the largest later one (flat: within 10%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_scale import make_files
from bench.harness import Served, peers, serve, service_settings, storescu_send, wait_until

MB = 2 ** 20


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


class Sampler:
    """VmRSS of one process every ``interval`` s in a thread; ``peak`` also asks the kernel (VmHWM)."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), status_kb(self.pid, "VmRSS") * 1024))
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak(self) -> int:
        return max([s for _, s in self.samples] + [status_kb(self.pid, "VmHWM") * 1024])


def burst(svc: Served, files: list[Path], timeout: float) -> float:
    """Send ``files`` in one association and wait until every job is delivered; returns seconds."""
    before = svc.finished()
    t0 = time.monotonic()
    storescu_send(svc.port, files, timeout=timeout)
    wait_until(lambda: svc.finished() >= before + len(files), timeout, "the burst to be delivered", interval=0.5)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="images in the burst (the issue's figure: --n 1000)")
    ap.add_argument("--soak", type=int, default=0, help="images in the soak (the issue's figure: 10000); 0: none")
    ap.add_argument("--rounds", type=int, default=10, help="soak rounds (RSS sampled after each)")
    ap.add_argument("--no-pacs", action="store_true", help="deliver to the FHIR server only")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dermgate-memory-"))
    root.chmod(0o755)
    files = make_files(root / "burst", args.n)
    per_round = max(1, args.soak // max(args.rounds, 1)) if args.soak else 0
    # the soak re-sends copies with new UIDs, so every image is new work
    rounds = [make_files(root / f"soak-{r}", per_round) for r in range(args.rounds)] if per_round else []
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (shared machine)")
    with peers(root, pacs=not args.no_pacs) as p:
        settings = service_settings(root / "work", p)
        with serve(settings) as svc:
            pid = svc.proc.pid
            ready = status_kb(pid, "VmRSS") * 1024
            sampler = Sampler(pid)
            seconds = burst(svc, files, timeout=max(1800.0, 3.0 * len(files)))
            time.sleep(2.0)
            after = status_kb(pid, "VmRSS") * 1024
            sampler.stop()
            peak = sampler.peak()
            soak_rss: list[int] = []
            for r, chunk in enumerate(rounds):
                burst(svc, chunk, timeout=max(1800.0, 3.0 * len(chunk)))
                soak_rss.append(status_kb(pid, "VmRSS") * 1024)
                print(f"  soak round {r + 1}/{len(rounds)}: {len(chunk) * (r + 1)} images, "
                      f"RSS {soak_rss[-1] / MB:.0f} MiB", flush=True)
            failed = svc.failed()
    shutil.rmtree(root, ignore_errors=True)      # the PACS and the store hold ~1 MB per image
    print(f"\none `dermgate serve` (scp, worker, dispatcher, api; SQLite; FHIR"
          f"{'' if args.no_pacs else ' + Orthanc'}), RSS of that process (/proc/<pid>/status)")
    print(f"  ready (model loaded): {ready / MB:.0f} MiB")
    print(f"burst of {len(files)} images ({len(files) / seconds:.2f} images/s): peak RSS {peak / MB:.0f} MiB "
          f"(VmHWM), after {after / MB:.0f} MiB; limit 1024 MiB: {'ok' if peak < 1024 * MB else 'EXCEEDED'}")
    if soak_rss:
        drift = max(soak_rss[1:] or soak_rss) / soak_rss[0] - 1
        print(f"soak of {per_round * len(rounds)} images in {len(rounds)} rounds: RSS "
              f"{' '.join(f'{r / MB:.0f}' for r in soak_rss)} MiB; drift after round 1 {drift * 100:+.1f}% "
              f"({'flat' if abs(drift) <= 0.10 else 'NOT flat'} within 10%)")
    print(f"  failed jobs: {failed}")


if __name__ == "__main__":
    main()
