"""How fast the commands that load no model answer, against Python's own start and TensorFlow's import.

    python benchmarks/bench_startup.py [--repeat 5]

Each command runs in a fresh process; the best of ``--repeat`` runs is printed, with the
ratio to a bare ``python -c pass`` (the floor) and to ``python -c "import tensorflow"``
(what every command cost in vizkit 0.1, when the built-in plugins imported it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "import tensorflow (0.1's cost)": [sys.executable, "-c", "import tensorflow"],
    "vizkit --help": [sys.executable, "-m", "vizkit.cli", "--help"],
    "vizkit run --help": [sys.executable, "-m", "vizkit.cli", "run", "--help"],
    "vizkit techniques": [sys.executable, "-m", "vizkit.cli", "techniques"],
    "vizkit plugins --json": [sys.executable, "-m", "vizkit.cli", "plugins", "--json"],
}


def best_of(command: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = {name: best_of(command, args.repeat) for name, command in COMMANDS.items()}
    floor, tensorflow = results["python -c pass (floor)"], results["import tensorflow (0.1's cost)"]
    print(f"{'command':<32} {'best s':>7} {'× floor':>8} {'× tf import':>12}")
    for name, seconds in results.items():
        print(f"{name:<32} {seconds:7.2f} {seconds / floor:8.1f} {seconds / tensorflow:12.2f}")


if __name__ == "__main__":
    main()
