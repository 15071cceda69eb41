"""Export a finished run's adapter (or merged / fully fine-tuned model) with a model card, and push it to the Hub.

    posttrain adapter export runs/sft_lora_footage --out exports/sft_lora_footage            # PEFT adapter + README.md
    posttrain adapter export runs/sft_lora_footage --out exports/sft_merged --merge          # full model, adapter merged
    posttrain adapter push exports/sft_lora_footage --repo-id you/tabletop-sft [--private]

An adapter export loads with `PeftModel.from_pretrained(load_model(BASE), DIR)` (or
`posttrain.adapters.load_adapter`, which also checks the base's weights hash); a merged or
full fine-tune export loads with `posttrain.models.load_model(DIR)`. The model card
(DIR/README.md) names the base model and its weights sha256 and holds the recipe, a data
summary, base-vs-post-trained metrics and a sample rollout GIF when the run wrote one.
Exports are written to a staging folder beside DIR and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from posttrain.adapters import ADAPTER_INFO
from posttrain.envs3d.jobs import (
    OUTPUT_MARKER,
    STAGING_OWNER,
    check_output_folder,
    read_json_object,
    replace_folder,
    staging_folder,
    write_output_marker,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", ADAPTER_INFO)
MODEL_FILES = ("config.json", "model.safetensors")
HF_MODEL_FILES = ("config.json", "tokenizer.safetensors", "backbone")
"""A posttrain.HFWorldModel folder (backbone/ is the causal LM's save_pretrained folder)."""
CARD = "README.md"


@dataclass
class ExportResult:
    """What `export_run` wrote."""

    out: Path
    """The export folder."""
    kind: str
    """'adapter' (PEFT LoRA folder), 'merged' (adapter merged into the base) or 'full' (full fine-tune)."""
    notes: list[str]
    """Messages for the user (e.g. --merge ignored for a full fine-tune)."""


# --- export -----------------------------------------------------------------------------------


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, overwrite: bool = False) -> ExportResult:
    """Copy (or merge) a run's adapter/ or model/ into `out` and write the model card there."""
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    adapter, model = run_dir / "adapter", run_dir / "model"
    if not (adapter / "adapter_config.json").is_file() and not (model / "config.json").is_file():
        raise FileNotFoundError(f"run folder {run_dir} has no adapter/ (LoRA run) or model/ (full fine-tune) to "
                                f"export: expected {adapter / 'adapter_config.json'} or {model / 'config.json'}")
    # The run is an input: an --out that is, holds or sits in it would be deleted by --overwrite or the rename.
    check_output_folder(out, overwrite, inputs=(run_dir,), owned_markers=(OUTPUT_MARKER,))
    staging = staging_folder(out)
    notes: list[str] = []
    try:
        if (adapter / "adapter_config.json").is_file():
            missing = [name for name in ADAPTER_FILES if not (adapter / name).is_file()]
            if missing:
                raise FileNotFoundError(f"adapter folder {adapter} lacks {', '.join(missing)}")
            info = read_json_object(adapter / ADAPTER_INFO)
            base_name, base_hash = info.get("base_model"), info.get("base_weights_sha256")
            if merge:
                kind = "merged"
                _merge(adapter, base_name, staging)
            else:
                kind = "adapter"
                for name in ADAPTER_FILES:
                    shutil.copy2(adapter / name, staging / name)
        else:
            kind = "full"
            if merge:
                notes.append(f"{run_dir} is a full fine-tune (model/, no adapter/): nothing to merge, "
                             "exporting the model as it is")
            for name in MODEL_FILES if (model / "model.safetensors").is_file() else HF_MODEL_FILES:
                if (model / name).is_dir():
                    shutil.copytree(model / name, staging / name)
                else:
                    shutil.copy2(model / name, staging / name)
            metadata = read_json_object(model / "config.json").get("metadata", {})
            base_name = metadata.get("base")
            # The hash recorded at training time; hashing the base folder now would describe whatever it holds
            # today (a newer default, a rewritten folder). Older runs did not record it.
            base_hash = metadata.get("base_weights_sha256") or "unknown (not recorded by this run)"
        gif = _sample_gif(run_dir)
        if gif is not None:
            shutil.copy2(gif, staging / "rollout.gif")
        (staging / CARD).write_text(model_card(run_dir, kind, base_name, base_hash, staging))
        (staging / STAGING_OWNER).unlink()  # the staging folder becomes the export itself
        write_output_marker(staging, "posttrain adapter export")
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out=out, kind=kind, notes=notes)


def _merge(adapter: Path, base_name: str | None, folder: Path) -> None:
    """Base + adapter -> merge_and_unload -> save_pretrained(folder); load_adapter checks the base's hash."""
    from posttrain.adapters import load_adapter
    from posttrain.models import load_model

    if not base_name:
        raise ValueError(f"{adapter / ADAPTER_INFO} names no base model; cannot merge")
    merged = load_adapter(load_model(base_name), adapter, base_name=base_name, merge=True)
    info = read_json_object(adapter / ADAPTER_INFO)
    metadata = {"base": base_name, "base_weights_sha256": info.get("base_weights_sha256"), "merged_adapter": str(adapter)}
    if "method" in info:
        metadata["method"] = info["method"]
    merged.save_pretrained(folder, metadata=metadata)


def _sample_gif(run_dir: Path) -> Path | None:
    """The report's before/after rollout GIF, else the newest training GIF in videos/."""
    report = run_dir / "report" / "rollout.gif"
    if report.is_file():
        return report
    videos = list((run_dir / "videos").glob("*.gif")) if (run_dir / "videos").is_dir() else []
    # By step number, not text: step-1000000 sorts before step-999999 as a string.
    return max(videos, key=lambda p: (int(re.sub(r"\D", "", p.stem) or 0), p.name)) if videos else None


# --- model card -------------------------------------------------------------------------------


def _public_name(base_name: str | None, what: str = "model folder") -> str:
    """A base's name for a card that may be pushed publicly: a built-in name as is, a local folder by its
    last component only (an absolute path would publish the trainer's directory layout)."""
    if not base_name:
        return "unknown"
    path = Path(base_name)
    return f"{path.name} (a local {what})" if path.is_absolute() or len(path.parts) > 1 else base_name


def model_card(run_dir: Path, kind: str, base_name: str | None, base_hash: str | None, export: Path) -> str:
    """Markdown model card (Hub front matter first) for an export of `run_dir`."""
    import yaml

    config_path = run_dir / "config.json"
    recipe = read_json_object(config_path) if config_path.is_file() else None
    method = (recipe or {}).get("method", "unknown")
    tags = ["posttrain", "world-model", method] + (["lora", "peft"] if kind == "adapter" else [])
    front = {"library_name": "peft" if kind == "adapter" else "posttrain", "tags": tags}
    how = {
        "adapter": ("A LoRA adapter (PEFT). Load it onto its base model:\n\n```python\n"
                    "from peft import PeftModel\nfrom posttrain.models import load_model\n\n"
                    f"model = PeftModel.from_pretrained(load_model({_snippet_name(base_name)!r}), \"THIS_FOLDER\")\n```\n\n"
                    "or `posttrain.adapters.load_adapter(model, \"THIS_FOLDER\", base_name=...)`, which refuses "
                    "a base whose weights sha256 differs from the one below."),
        "merged": ("The base model with the LoRA adapter merged in (`merge_and_unload`). Load it with\n"
                   "`posttrain.models.load_model(\"THIS_FOLDER\")`."),
        "full": ("A fully fine-tuned model (dynamics transformer trained, tokenizer frozen). Load it with\n"
                 "`posttrain.models.load_model(\"THIS_FOLDER\")`."),
    }[kind]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {run_dir.name}: {method} post-training of a posttrain world model", "", how, "",
             "## Base model", "",
             f"- name: `{_public_name(base_name)}`",
             f"- weights sha256 (recorded when it was trained): `{base_hash or 'unknown (not recorded)'}`"]
    if kind in ("merged", "full"):
        from posttrain.models import weights_hash

        lines.append(f"- this export's weights sha256: `{weights_hash(export)}`")
    lines += ["", "## Data", "", *_data_summary(recipe), "", "## Metrics", "", *_metrics(run_dir, kind), ""]
    if (export / "rollout.gif").is_file():
        lines += ["## Sample rollout", "", "![rollout](rollout.gif)", "",
                  "Panels: context | base | post-trained | ground truth (greedy, on a held-out clip) or, for a "
                  "training GIF, context | prediction | ground truth.", ""]
    else:
        lines += ["## Sample rollout", "", "The run wrote no rollout GIF (`train.eval_at_end` was off; set "
                  "`train.video_every` for training GIFs).", ""]
    lines += ["## Recipe", "", f"From the run's `config.json` (`{run_dir.name}/`); rerun with `posttrain run "
              "RECIPE.yaml`. Local paths are shown by their last folder name.", "",
              "```yaml", yaml.safe_dump(_public_recipe(recipe), sort_keys=False).strip() if recipe
              else "# config.json missing", "```", ""]
    return "\n".join(lines)


PATH_KEYS = ("model", "out", "path", "cache_dir", "init")


def _snippet_name(base_name: str | None) -> str:
    """What a card's load snippet passes to load_model: a built-in name as is, a local folder as a placeholder."""
    public = _public_name(base_name)
    return public if public == base_name else f"PATH/TO/{Path(base_name).name}"


def _public_recipe(value, key: str = ""):
    """The recipe with every local path (model=, out=, data.path, *_path, ...) by its last folder name: a card
    may be pushed publicly, and absolute paths would publish the trainer's directory layout."""
    if isinstance(value, dict):
        return {k: _public_recipe(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_public_recipe(v, key) for v in value]
    if isinstance(value, str) and value and (key in PATH_KEYS or key.endswith("_path")):
        return _public_name(value, "folder")
    return value


def _data_summary(recipe: dict | None) -> list[str]:
    if not recipe:
        return ["- unknown (the run folder has no config.json)"]
    lines = []
    held_out = None if recipe.get("heldout_fraction") else (recipe.get("eval") or {}).get("data")
    for label, data in (("training", recipe.get("data")), ("held-out", held_out)):
        if not isinstance(data, dict):
            continue
        if data.get("path"):
            lines.append(f"- {label}: footage dataset `{_public_name(data['path'], 'dataset')}`, {_clip_count(Path(data['path']))}")
        else:
            lines.append(f"- {label}: envs3d seeds `{data.get('seeds')}`, {data.get('frames')} frames per episode "
                         f"at {data.get('image_size')}x{data.get('image_size')} px"
                         + (f", scene overrides {data['scene']}" if data.get("scene") else ""))
    if recipe.get("heldout_fraction"):
        lines.append(f"- held-out: the last {recipe['heldout_fraction']:.0%} of the training dataset's clips "
                     "(kept out of training)")
    return lines or ["- no data section in the recipe"]


def _clip_count(path: Path) -> str:
    manifest = path / "manifest.json"
    if manifest.is_file():
        data = read_json_object(manifest)
        return f"{data.get('clips', '?')} clips (from manifest.json)"
    if (path / "dataset_info.json").is_file():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        return f"{len(dataset)} clips"
    return "clip count unknown (folder not found at export time)"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.5g}" if isinstance(value, float) else str(value)


def _metrics(run_dir: Path, kind: str = "adapter") -> list[str]:
    report = run_dir / "report"
    lines: list[str] = []
    if (report / "metrics.json").is_file():
        results = read_json_object(report / "metrics.json")
        held = str(results.get("eval_seeds"))
        public = results.get("eval_clips_public")  # footage: the clips, named without local paths
        where = f"{public} (a local dataset)" if public else f"seeds `{held}`"
        base_is = "adapter disabled" if kind in ("adapter", "merged") else "the frozen base model"
        lines += [f"Held-out rollouts ({where}, horizon {results.get('horizon')}), base ({base_is}) vs "
                  "post-trained, beside the trivial baselines (repeat the last context frame; the training "
                  "data's mean frame):", "",
                  "| temperature | metric | persistence | mean image | base | post-trained |", "|---|---|---|---|---|---|"]
        for temperature, pair in results.get("temperatures", {}).items():
            baselines = pair["base"].get("baselines", {})
            for metric in ("mse_mean", "psnr_mean", "ssim_mean", "object_presence_mean", "useful_horizon",
                           "consistency_3d_mean", "loop_closure_error_mean"):
                if metric not in pair["base"]:
                    continue  # footage reports have no simulator metrics
                persistence, mean_image = (baselines.get(name, {}).get(metric) for name in ("persistence",
                                                                                            "mean_image"))
                lines.append(f"| {temperature} | {metric} | {_fmt(persistence)} | {_fmt(mean_image)} | "
                             f"{_fmt(pair['base'].get(metric))} | {_fmt(pair['post'].get(metric))} |")
        lines.append("")
    if (report / "heldout_loss.json").is_file():
        held = read_json_object(report / "heldout_loss.json")
        lines += [f"Teacher-forced token loss (nats/token) on {held.get('heldout_clips')} held-out clips of "
                  f"{held.get('clip_frames')} frames:", "", "| | base | post-trained |", "|---|---|---|",
                  f"| held-out loss | {_fmt(held.get('heldout_loss_base'))} | {_fmt(held.get('heldout_loss_post'))} |",
                  ""]
    if (report / "tokenizer.json").is_file():
        lines += _decoder_fit_metrics(read_json_object(report / "tokenizer.json"))
    if not lines:
        from posttrain.logging_utils import read_metrics

        records = list(read_metrics(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").is_file() else []
        if records:
            last = records[-1]
            lines += ["No held-out report; the last record of metrics.jsonl:", "", "| key | value |", "|---|---|",
                      *[f"| {key} | {_fmt(value)} |" for key, value in last.items()], ""]
        else:
            lines.append("No metrics were found in the run folder.")
    return lines


def _decoder_fit_metrics(fit: dict) -> list[str]:
    """An adapt_tokenizer run's report/tokenizer.json as card lines: the held-out frames' reconstruction and,
    where the decoder was fitted to rollouts, the held-out rollouts decoded by the old and the new decoder."""
    before, after = fit.get("held_out_before") or {}, fit.get("held_out_after") or {}
    adapter = fit.get("adapter")
    lines = [f"Decoder fit (`adapt_tokenizer`, {fit.get('steps')} steps, loss `{fit.get('loss')}`, rollout share "
             f"{fit.get('rollouts', 0)}"
             + (f", the rollouts of the adapter {_public_name(adapter, 'adapter')}, re-based onto the fitted "
                "decoder as the run's adapter/"
                if adapter else "")
             + f"). Held-out clips {fit.get('heldout_clips')}: the token ids and the dynamics are unchanged; "
             "only what a token draws differs.", "",
             "| held-out measure | before | after |", "|---|---|---|"]
    for key, label in (("psnr_db", "reconstruction PSNR (dB) of true frames"), ("ssim", "reconstruction SSIM")):
        lines.append(f"| {label} | {_fmt(before.get(key))} | {_fmt(after.get(key))} |")
    rollouts = fit.get("held_out_rollouts") or {}
    persistence = (rollouts.get("before") or {}).get("persistence", {}).get("ssim")
    for temperature in ("T=0", "T=1"):
        old, new = ((rollouts.get(when) or {}).get(temperature, {}).get("ssim") for when in ("before", "after"))
        if old is not None or new is not None:
            lines.append(f"| rollout SSIM, {temperature} ({rollouts.get('windows')} windows, {rollouts.get('horizon')} "
                         f"frames from {rollouts.get('context')}; persistence {_fmt(persistence)}) | {_fmt(old)} | "
                         f"{_fmt(new)} |")
    return [*lines, ""]


# --- push -------------------------------------------------------------------------------------


def push_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create (or reuse) the Hub model repo `repo_id` and upload `folder` (an export) to it; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    folder = Path(folder)
    if not (folder / CARD).is_file() or not any((folder / name).is_file()
                                                 for name in ("adapter_config.json", "config.json")):
        raise FileNotFoundError(f"{folder} is not an export folder (needs {CARD} and adapter_config.json or "
                                "config.json); run `posttrain adapter export RUN_DIR --out DIR` first")
    api = HfApi(token=token)
    # HTTPError: the HTTP client's base error (no network, timeouts), which the Hub's status errors extend.
    try:
        api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=f"Upload {folder.name} with posttrain adapter push")
    except (HTTPError, OSError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConnectionError(f"adapter push of {folder} to the Hub repo {repo_id!r} failed: {detail} (check the "
                              "network connection, the repo id and the token: --token, HF_TOKEN or "
                              "`hf auth login`)") from None
    return str(getattr(commit, "commit_url", commit))


# --- command line -----------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    result = export_run(args.run_dir, args.out, merge=args.merge, overwrite=args.overwrite)
    for note in result.notes:
        print(f"note: {note}")
    print(f"exported {result.kind} from {args.run_dir} to {result.out} (model card: {result.out / CARD})")
    return 0


def _push(args: argparse.Namespace) -> int:
    url = push_folder(args.folder, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0


def add_adapter_parser(subparsers) -> argparse.ArgumentParser:
    """Register `adapter export` and `adapter push`; the handler (args.func) returns the exit code."""
    adapter = subparsers.add_parser("adapter", help="export a run's adapter with a model card; push it to the Hub")
    adapter_sub = adapter.add_subparsers(dest="adapter_command", metavar="SUBCOMMAND", required=True)
    export = adapter_sub.add_parser("export", help="copy (or merge) a run's adapter and write a model card",
                                    description=__doc__.splitlines()[0])
    export.add_argument("run_dir", help="a finished run folder (holds adapter/ or model/, config.json)")
    export.add_argument("--out", required=True, help="export folder (written atomically)")
    export.add_argument("--merge", action="store_true",
                        help="merge the adapter into the base and write a full model (load_model(DIR))")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=_export)
    push = adapter_sub.add_parser("push", help="upload an export folder to a Hugging Face Hub model repo")
    push.add_argument("folder", help="an export folder from `posttrain adapter export`")
    push.add_argument("--repo-id", required=True, help="Hub repo, e.g. your-name/tabletop-sft (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or a cached `hf auth login`)")
    push.set_defaults(func=_push)
    return adapter
