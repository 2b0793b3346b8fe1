"""What a training run tells the user: the tutorial's memory and time report, and a loss plot."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from training.modeling import device

LIBRARIES = ("unsloth", "unsloth_zoo", "torch", "transformers", "peft", "trl", "datasets", "bitsandbytes")


@dataclass(frozen=True)
class MemoryReport:
    device: str
    total_gb: float
    start_gb: float
    peak_gb: float

    @property
    def for_training_gb(self) -> float:
        return round(self.peak_gb - self.start_gb, 3)


class Memory:
    """Reserved GPU memory like the tutorial; on the CPU, the process's peak resident memory."""

    def __init__(self, start_gb: float):
        self.start_gb = start_gb
        self.peak_gb = start_gb

    @staticmethod
    def _now_gb() -> float:
        import torch

        if torch.cuda.is_available():
            return round(torch.cuda.max_memory_reserved() / 2**30, 3)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)

    @classmethod
    def start(cls) -> Memory:
        return cls(cls._now_gb())

    def finish(self) -> MemoryReport:
        here = device()
        self.peak_gb = self._now_gb()
        return MemoryReport(f"{here.kind.upper()} = {here.name}", here.total_gb, self.start_gb, self.peak_gb)


def render(memory: MemoryReport, metrics: dict, samples: int, rows: int, dropped, samples_per_s: float, val_nll) -> str:
    kind = "reserved memory" if memory.device.startswith("CUDA") else "resident memory"
    runtime = metrics.get("train_runtime", 0.0)
    lines = [
        f"{memory.device}. Max memory = {memory.total_gb} GB. {memory.start_gb} GB {kind} before training.",
        f"{runtime:.1f} seconds ({runtime / 60:.2f} minutes) used for training; "
        f"{samples} samples in {rows} rows, {samples_per_s:.2f} samples/s.",
        f"Peak {kind} = {memory.peak_gb} GB; for training = {memory.for_training_gb} GB.",
        f"Peak {kind} % of max memory = {100 * memory.peak_gb / memory.total_gb:.3f} %; "
        f"for training = {100 * memory.for_training_gb / memory.total_gb:.3f} %.",
    ]
    if metrics.get("train_loss") is not None:
        lines.append(f"Mean training loss = {metrics['train_loss']:.4f}.")
    if val_nll is not None:
        lines.append(f"Held-out NLL per reply token = {val_nll:.4f}.")
    for reason, count in sorted(dict(dropped).items()):
        lines.append(f"Samples {reason}: {count}.")
    return "\n".join(lines)


def plot_losses(losses: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if losses:
        steps, values = zip(*losses)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
