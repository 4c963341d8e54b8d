"""The quickstart's report: what each stage cost, what it learned, and where everything went.

``report.md`` (for a reader) and ``report.json`` (the same figures for a program):

* loss curves of the three training runs (``loss_curves.png``);
* wall time of every step, and training tokens/s per stage from its ``metrics.jsonl``;
* loss by position on held-out documents for the stage-1 and stage-2 checkpoints and the
  export (``megalong eval``'s ``loss_by_position.png``), with the mean loss in two bands of
  positions: within stage 1's training length and beyond it, and a sentence that says what
  the figures show;
* recall by length (``niah_single``, ``kv_lookup``) of the same three models;
* the size of every artifact and the command that reruns each step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megalong.eval.tasks import KV_KEYS

STAGES = ("stage1", "stage2", "sft")
# A model copying the number of a random key of kv_lookup's alphabet scores about this.
KV_CHANCE = 1 / len(KV_KEYS)


def read_metrics(metrics_file: Path) -> dict[int, dict]:
    """Records by step; a resumed run rewrites the steps after its checkpoint, the last wins."""
    by_step: dict[int, dict] = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return dict(sorted(by_step.items()))


def losses_of(by_step: dict[int, dict]) -> list[tuple[int, float]]:
    """(step, loss) pairs of :func:`read_metrics`'s records, one per step."""
    return [(step, float(record["loss"])) for step, record in by_step.items()]


def read_losses(metrics_file: Path) -> list[tuple[int, float]]:
    return losses_of(read_metrics(metrics_file))


def throughput(by_step: dict[int, dict]) -> dict:
    """Training steps, tokens, time inside steps and tokens/s of one run, from
    :func:`read_metrics`'s records (each has the step's time and its tokens)."""
    records = list(by_step.values())
    seconds = sum(r["step_time_s"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    return {"steps": len(records), "tokens": tokens, "step_seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None}


def loss_fell(losses: list[tuple[int, float]], window: int = 3) -> tuple[float, float]:
    """Mean loss of the first and of the last ``window`` steps."""
    values = [loss for _, loss in losses]
    window = max(1, min(window, len(values) // 2))
    return sum(values[:window]) / window, sum(values[-window:]) / window


def size_bytes(path: Path) -> int:
    """Bytes of the regular files at or under ``path``; symbolic links count as links (the
    corpus links the standard library's packages, which are not the quickstart's to count)."""
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


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


def position_bands(buckets: list[dict], boundary: int) -> dict:
    """Mean loss over the positions before ``boundary`` and from it on, weighted by tokens;
    ``boundary`` must fall between buckets (the quickstart's bucket width divides it)."""
    if any(b["start"] < boundary < b["end"] for b in buckets):
        raise ValueError(f"position {boundary} falls inside a bucket; choose a bucket width that divides it")

    def mean(selected: list[dict]) -> float | None:
        tokens = sum(b["tokens"] for b in selected)
        return sum(b["mean_loss"] * b["tokens"] for b in selected if b["tokens"]) / tokens if tokens else None

    return {"within": mean([b for b in buckets if b["end"] <= boundary]),
            "beyond": mean([b for b in buckets if b["start"] >= boundary])}


def _loss_words(bands: dict[str, dict], boundary: int, end: int) -> list[str]:
    """What the bands show, in words: computed from the figures, whatever they are."""
    if "stage1" not in bands or "stage2" not in bands:
        return []
    one, two = bands["stage1"], bands["stage2"]
    within, beyond = two["within"] - one["within"], two["beyond"] - one["beyond"]
    lines = [f"Stage 2 changed the mean loss by {beyond:+.2f} beyond stage 1's length (positions {boundary}-{end - 1}) "
             f"and by {within:+.2f} within it."]
    # Compared at the precision shown: a difference the table cannot show is not claimed.
    if round(beyond, 2) < round(within, 2):
        lines.append("Its gain is larger past the length stage 1 was trained at: the longer context of stage 2 "
                     "is what helped there, beyond general training.")
    elif round(beyond, 2) > round(within, 2):
        lines.append("Its gain is smaller past stage 1's length than within it: at this scale stage 2 did not "
                     "help the positions beyond stage 1's length more than the others.")
    else:
        lines.append("Its gain is the same past stage 1's length as within it: at this scale stage 2 did not "
                     "help the positions beyond stage 1's length more than the others.")
    for label, band in bands.items():
        relation = "lower" if band["beyond"] < band["within"] else "not lower"
        lines.append(f"{label}: loss beyond {boundary} is {relation} than within ({band['beyond']:.2f} vs "
                     f"{band['within']:.2f})" + (": tokens with more context before them are predicted better."
                                                  if relation == "lower" else "."))
    return [" ".join(lines[:2]), "", *(f"- {line}" for line in lines[2:])]


def _recall_words(rows: list[dict]) -> list[str]:
    """kv_lookup recall by length of each model (results.json rows), how it compares with
    copying at random, and what the model answered to its first prompt."""
    lines = []
    for row in rows:
        by_length = (row.get("recall") or {}).get("summary", {}).get("by_length", {}).get("kv_lookup")
        if not by_length:
            continue
        figures = ", ".join(f"{score:.2f} at {length}" for length, score in by_length.items())
        relation = "above" if max(by_length.values()) > KV_CHANCE else "no better than"
        verdict = f"{relation} the {KV_CHANCE:.2f} of copying a random key's number"
        first = next(s for s in row["recall"]["samples"] if s["task"] == "kv_lookup")
        lines.append(f"- {row['label']}: kv_lookup {figures} tokens; best {verdict}. Its first answer "
                     f"({first['length']} tokens, depth {first['depth']:g}): {first['prediction']!r} "
                     f"for {first['answers'][0]!r}.")
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _bytes(value: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value} bytes"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value / 60:.1f} min" if value >= 90 else f"{value:.0f} s"


def write_report(quickstart, elapsed_s: float) -> dict:
    """Write ``report.md``, ``report.json`` and ``loss_curves.png`` under the output directory."""
    out: Path = quickstart.out
    size = quickstart.size
    boundary, end = size.stage1_seq_length, size.stage2_seq_length
    metrics = {stage: read_metrics(quickstart.run_dir(stage) / "metrics.jsonl") for stage in STAGES}
    curves = {stage: losses_of(by_step) for stage, by_step in metrics.items()}
    plot_losses(curves, out / "loss_curves.png")
    first, last = loss_fell(curves["stage1"])
    steps = quickstart.finished_steps()
    stages = {stage: {"wall_seconds": steps.get(stage, {}).get("seconds"),
                      **throughput(metrics[stage])} for stage in STAGES}

    results = json.loads((quickstart.eval_dir / "results.json").read_text())
    bands = {row["label"]: position_bands(row["perplexity"]["buckets"], boundary)
             for row in results["models"] if row.get("perplexity")}
    recall = {row["label"]: row["recall"]["summary"]["by_length"] for row in results["models"] if row.get("recall")}

    artifacts = {
        "corpus": out / "corpus", "datasets (all)": quickstart.data,
        "held-out dataset": quickstart.heldout_prefix.parent,
        "recipes": out / "recipes",
        **{f"checkpoints {stage}": quickstart.run_dir(stage) for stage in STAGES},
        "hf export": quickstart.export_dir, "eval": quickstart.eval_dir,
        "loss curves": out / "loss_curves.png",
    }
    report = {
        "elapsed_s": round(elapsed_s, 1),
        "size": quickstart.config.size,
        "stage1_loss_first": first,
        "stage1_loss_last": last,
        "final_losses": {stage: losses[-1][1] for stage, losses in curves.items() if losses},
        "stages": stages,
        "steps": {name: {**step, "skipped_this_run": name in quickstart.skipped} for name, step in steps.items()},
        "steps_seconds": round(sum(step["seconds"] for step in steps.values()), 1),
        "position_bands": {"boundary": boundary, "end": end, "models": bands},
        "recall_by_length": recall,
        "artifacts": {name: {"path": str(path), "bytes": size_bytes(path)} for name, path in artifacts.items()},
    }

    lengths = [str(n) for n in results["settings"]["recall"]["lengths"]] if recall else []
    lines = [
        "# megalong quickstart report",
        "",
        f"Finished in {_seconds(elapsed_s)} (size `{quickstart.config.size}`)"
        + (f"; {len(quickstart.skipped)} steps were already done by an earlier run." if quickstart.skipped else ".")
        + f" The steps took {_seconds(report['steps_seconds'])} in all, each timed by the run that finished it.",
        "",
        f"Stage 1 loss: {first:.3f} over the first steps -> {last:.3f} over the last steps.",
        "Final losses: " + ", ".join(f"{k} {v:.3f}" for k, v in report["final_losses"].items()) + ".",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Training cost",
        "",
        "Wall time is the whole command (start-up, data, checkpoints); tokens/s counts only the steps.",
        "",
        *_table(["stage", "steps", "tokens", "wall time", "time in steps", "tokens/s"],
                [[stage, str(s["steps"]), f"{s['tokens']:,}", _seconds(s["wall_seconds"]),
                  _seconds(s["step_seconds"]), f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] else "-"]
                 for stage, s in stages.items()]),
        "",
        f"## Loss by position on held-out documents (out to stage 2's {end} tokens)",
        "",
        f"Reference chapters kept out of every training set; mean token loss (nats) in two bands of positions: "
        f"within stage 1's training length ({boundary} tokens) and beyond it.",
        "",
        "![loss by position](eval/loss_by_position.png)",
        "",
        *_table(["model", f"positions 1-{boundary - 1}", f"positions {boundary}-{end - 1}", "beyond - within"],
                [[label, f"{b['within']:.3f}", f"{b['beyond']:.3f}", f"{b['beyond'] - b['within']:+.3f}"]
                 for label, b in bands.items()]),
        "",
        *_loss_words(bands, boundary, end),
        "",
        "## Recall by context length",
        "",
        "Exact match, the same base-format prompts for every model. `niah_single` is the needle test for real "
        "models (a model this small is not expected to pass it); `kv_lookup` asks for the number of a key that "
        f"appears once among records of {len(KV_KEYS) - 1} other keys, the format of the quickstart's "
        "`synthetic_kv` training domain.",
        "",
        *_table(["model", "task", *(f"{n} tokens" for n in lengths)],
                [[label, task, *(f"{by_length[n]:.2f}" for n in lengths)]
                 for label, tasks in recall.items() for task, by_length in tasks.items()]),
        "",
        *_recall_words(results["models"]),
        "",
        "![recall heatmap](eval/recall_heatmap.png)",
        "",
        "## Where everything went",
        "",
        f"This report: `{out / 'report.md'}`, its figures in `{out / 'report.json'}`.",
        "",
        *_table(["artifact", "size", "path"],
                [[name, _bytes(a["bytes"]), f"`{a['path']}`"] for name, a in report["artifacts"].items()]),
        "",
        "## Rerunning a step by hand",
        "",
        "Each step's command (run from the output directory) and the wall time of the run that finished it:",
        "",
    ]
    for name, step in steps.items():
        lines += [f"- {step['title']} ({_seconds(step['seconds'])}):", "", f"      {step['command']}", ""]
    markdown = "\n".join(lines)
    for name, text in (("report.md", markdown), ("report.json", json.dumps(report, indent=2))):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    report["markdown"] = markdown
    return report
