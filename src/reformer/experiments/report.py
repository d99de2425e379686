"""What every experiment writes: results.json, a README.md with its tables, and its PNG plots.

Each report states how it was made (the exact command, package versions, the machine, the seed and
the wall time), so that a number in ``docs/results/`` can be traced and re-made. Files are written
atomically; a killed experiment leaves the previous report whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..files import cpuinfo, write_atomically


def machine() -> dict[str, Any]:
    """The software and hardware a result was measured on. The CPU and the vector instructions torch's
    kernels use decide float32 rounding, and a training run that is bitwise repeatable on one CPU can take
    another path on another, so both are recorded."""
    from ..version import __version__

    processor = platform.processor() or platform.machine()
    return {
        "reformer": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": processor,
        "cpu": cpuinfo("model name") or processor,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def same_weights(model, **config_overrides):
    """A copy of ``model`` with its config changed (e.g. the attention's buckets or chunks), in eval mode.

    Only settings that change no parameter may be overridden (attention windows, rounds, buckets, seeds).
    """
    from ..nn.model import ReformerLM

    other = ReformerLM(dataclasses.replace(model.config, **config_overrides))
    other.load_state_dict(model.state_dict())
    return other.eval()


def full_attention_overrides(length: int) -> dict[str, Any]:
    """Config overrides that make LSH layers attend fully (shared QK) over ``length`` tokens.

    One bucket, and a chunk as long as the sequence (rounded up to a multiple of 64; padding is masked)
    with one chunk of reach back: the bucket window then holds every earlier position. (With
    n_chunks_before=0 it would hold none but the query itself.) Causal, self and padding masks apply
    as in LSH attention.
    """
    return dict(n_buckets=1, n_hashes=1, chunk_length=-(-length // 64) * 64, n_chunks_before=1)


def is_positive_int(value: Any) -> bool:
    """Whether value is an int >= 1 (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_positive_ints(settings: Any, names: Sequence[str]) -> None:
    """Raise a ValueError naming the first of ``settings``' fields ``names`` that is not a positive int."""
    for name in names:
        value = getattr(settings, name)
        if not is_positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats keep the precision they were formatted with by the caller."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    """The report of one experiment run, filled in as it goes and written by ``write``."""

    name: str
    out_dir: Path
    seed: int
    quick: bool
    settings: dict[str, Any]
    command: str = field(default_factory=lambda: " ".join(["reformer", *sys.argv[1:]])
                         if Path(sys.argv[0]).name in ("reformer", "__main__.py") else " ".join(sys.argv))
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def work_dir(self) -> Path:
        """Where trained run folders go: never into the published report (weights do not belong there).

        Quick runs keep them beside their report; full runs under runs/experiments/NAME.
        """
        return self.out_dir / "runs" if self.quick else Path("runs/experiments") / self.name

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def header(self) -> dict[str, Any]:
        return {"experiment": self.name, "command": self.command, "quick": self.quick, "seed": self.seed,
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started)),
                "wall_seconds": round(time.time() - self.started, 1), "machine": machine(),
                "settings": self.settings}

    def write(self, results: dict[str, Any], title: str, body: str) -> dict[str, Any]:
        """Write results.json and README.md (``body`` is the markdown of the tables and plots)."""
        head = self.header()
        record = {**head, "results": results}
        write_atomically(self.path("results.json"), json.dumps(record, indent=2) + "\n")
        m = head["machine"]
        about = (f"- Command: `{head['command']}`\n"
                 f"- Seed: {self.seed}; wall time: {head['wall_seconds']:.0f} s"
                 f"{' (quick mode: a smoke test, not a result)' if self.quick else ''}\n"
                 f"- Versions: reformer {m['reformer']}, torch {m['torch']}, Python {m['python']}\n"
                 f"- Machine: {m['platform']}, {m['cpu']} ({m['cpu_capability']}), {m['cpus']} CPUs "
                 f"({m['torch_threads']} torch thread(s)), {m['device']}\n"
                 f"- Settings: `{json.dumps(self.settings, sort_keys=True)}`\n")
        write_atomically(self.path("README.md"), f"# {title}\n\n{about}\n{body.strip()}\n")
        return record
