"""Long fuzzing runs: mutate the committed corpus (and random bytes) into each target for a
given time. An input that raises anything but the target's own error, or runs over a second,
is saved as tests/fuzz/corpus/TARGET/crash-SHA and reported; it then stays a regression test.

    python -m tests.fuzz.run TARGET [TARGET ...] --minutes 10
"""

from __future__ import annotations

import argparse
import hashlib
import random
import signal
import sys
import time
import traceback
from pathlib import Path

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"


class Hang(Exception):
    pass


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        choice = rng.random()
        if not out or choice < 0.15:
            out += rng.randbytes(rng.randint(1, 64))
        elif choice < 0.45:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif choice < 0.6:
            i = rng.randrange(len(out))
            out[i] = rng.choice([0, 0xFF, 0x7F, 0x80, ord("/"), ord("."), 0x1F, 0x8B])
        elif choice < 0.75:
            del out[rng.randrange(len(out)) :]
        elif choice < 0.9 and pool:
            other = rng.choice(pool)
            cut = rng.randrange(len(out) + 1)
            out[cut:] = other[rng.randrange(len(other) + 1) :]
        else:
            i = rng.randrange(len(out) + 1)
            out[i:i] = rng.randbytes(rng.randint(1, 16))
    return bytes(out[: 1 << 20])


def fuzz(name: str, minutes: float, seed: int) -> int:
    target = TARGETS[name]
    folder = CORPUS / name
    pool = [p.read_bytes() for p in sorted(folder.glob("*"))] if folder.is_dir() else []
    rng = random.Random(seed)
    deadline = time.monotonic() + minutes * 60
    runs = crashes = 0

    def alarm(_signum: int, _frame: object) -> None:
        raise Hang()

    signal.signal(signal.SIGALRM, alarm)
    while time.monotonic() < deadline:
        base = (
            rng.choice(pool) if pool and rng.random() < 0.9 else rng.randbytes(rng.randint(0, 512))
        )
        data = mutate(rng, base, pool)
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        try:
            target(data)
        except Exception as err:  # noqa: BLE001 - anything escaping the target is a finding
            signal.setitimer(signal.ITIMER_REAL, 0)
            crashes += 1
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{hashlib.sha256(data).hexdigest()[:16]}"
            path.write_bytes(data)
            kind = "hang" if isinstance(err, Hang) else type(err).__name__
            print(f"{name}: {kind} saved as {path}", file=sys.stderr)
            traceback.print_exc(limit=3)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        runs += 1
    print(f"{name}: {runs} inputs in {minutes:g} min, {crashes} crash(es)")
    return crashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", choices=sorted(TARGETS))
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    print(f"seed {args.seed}")
    return 1 if sum(fuzz(t, args.minutes, args.seed) for t in args.targets) else 0


if __name__ == "__main__":
    sys.exit(main())
