"""The quickstart's report: loss curves of the three training runs and the recall table."""

from __future__ import annotations

import json
import os
from pathlib import Path

STAGES = ("stage1", "stage2", "sft")


def read_losses(metrics_file: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs; a resumed run rewrites the steps after its checkpoint, the last wins."""
    by_step: dict[int, float] = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = float(record["loss"])
    return sorted(by_step.items())


def loss_fell(losses: list[tuple[int, float]], window: int = 3) -> tuple[float, float]:
    """Mean loss of the first and of the last ``window`` steps."""
    values = [loss for _, loss in losses]
    window = max(1, min(window, len(values) // 2))
    return sum(values[:window]) / window, sum(values[-window:]) / window


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    for stage, losses in curves.items():
        if not losses:
            continue
        steps = [offset + step for step, _ in losses]
        ax.plot(steps, [loss for _, loss in losses], marker=".", label=stage)
        offset = steps[-1]
    ax.set_xlabel("training step (stages run one after another)")
    ax.set_ylabel("loss")
    ax.set_title("megalong quickstart: stage 1 -> stage 2 (longer context) -> SFT")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def recall_table(results_file: Path) -> list[str]:
    """Recall by length, one row per evaluated model and task (``megalong eval``'s results.json)."""
    results = json.loads(results_file.read_text())
    rows = [(model["label"], task, accuracies) for model in results.get("models", []) if model.get("recall")
            for task, accuracies in model["recall"]["summary"]["by_length"].items()]
    if not rows:
        return []
    lengths = list(rows[0][2])
    lines = ["| model | task | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for label, task, accuracies in rows:
        lines.append(f"| {label} | {task} | " + " | ".join(f"{accuracies[n]:.2f}" for n in lengths) + " |")
    return lines


def write_report(quickstart, elapsed_s: float) -> dict:
    """Write ``report.md``, ``report.json`` and ``loss_curves.png`` under the output directory."""
    out: Path = quickstart.out
    curves = {stage: read_losses(quickstart.run_dir(stage) / "metrics.jsonl") for stage in STAGES}
    plot_losses(curves, out / "loss_curves.png")
    first, last = loss_fell(curves["stage1"])
    report = {
        "elapsed_s": round(elapsed_s, 1),
        "size": quickstart.config.size,
        "stage1_loss_first": first,
        "stage1_loss_last": last,
        "final_losses": {stage: losses[-1][1] for stage, losses in curves.items() if losses},
        "step_seconds": {title: round(t, 1) for title, t in quickstart.timings.items()},
        "artifacts": {
            "data": str(quickstart.data),
            "recipes": str(out / "recipes"),
            **{f"checkpoints_{stage}": str(quickstart.run_dir(stage)) for stage in STAGES},
            "hf_export": str(quickstart.export_dir),
            "eval": str(quickstart.eval_dir),
            "loss_curves": str(out / "loss_curves.png"),
            "report": str(out / "report.md"),
        },
    }
    lines = [
        "# megalong quickstart report",
        "",
        f"Finished in {elapsed_s / 60:.1f} minutes (size `{quickstart.config.size}`)"
        + (f"; {len(quickstart.skipped)} steps were already done by an earlier run." if quickstart.skipped else "."),
        "",
        f"Stage 1 loss: {first:.3f} over the first steps -> {last:.3f} over the last steps.",
        "Final losses: " + ", ".join(f"{k} {v:.3f}" for k, v in report["final_losses"].items()) + ".",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Recall by context length (exact match; a model this small is not expected to recall)",
        "",
        *recall_table(quickstart.eval_dir / "results.json"),
        "",
        "## Where everything went",
        "",
        *(f"- {name}: `{path}`" for name, path in report["artifacts"].items()),
        "",
    ]
    for name, text in (("report.md", "\n".join(lines)), ("report.json", json.dumps(report, indent=2))):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    report["markdown"] = "\n".join(lines)
    return report
