"""Runs every benchmark script in this folder, one after the other (each writes benchmarks/results/*.json).

Run them on an otherwise idle machine: they report ratios measured within one run, but other processes
sharing the cores still distort them. The results benchmarks, which train many models (``presets.py``,
``compare.py``, ``ablations.py``, ``guidance.py``: tens of minutes each on 2 cores), are run on their own.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["eval_speed.py", "store.py", "pipeline.py", "gradient_bias.py", "sampling.py"]

if __name__ == "__main__":
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script)], check=True)
