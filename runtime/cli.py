"""The `smolvlm-edge` command line: export, run, demo, quantize, parity, mobile, convert-ort, providers.

Heavy imports (torch, transformers) happen only inside the subcommands that need them, so `run`
works on a runtime-only install.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from .errors import SmolVLMEdgeError
from .providers import FALLBACKS, PROVIDERS


GRAPH_KEYS = {"vision": "vision_encoder", "embed": "embed_tokens", "decoder": "decoder_model_merged"}


def parse_precision(text: str) -> str | dict[str, str]:
    """'q4' for every graph, or 'vision=int8,decoder=q4' per graph (unnamed graphs stay fp32)."""
    if "=" not in text:
        return text
    chosen = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        graph = GRAPH_KEYS.get(key.strip(), key.strip())
        if graph not in GRAPH_KEYS.values() or not value.strip():
            raise argparse.ArgumentTypeError(
                f"bad precision {part!r}: use NAME or vision=NAME,embed=NAME,decoder=NAME")
        chosen[graph] = value.strip()
    return {g: chosen.get(g, "fp32") for g in GRAPH_KEYS.values()}


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults come from the bundle's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, help="most tokens to generate")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="always take the most likely token")
    mode.add_argument("--sample", action="store_true", help="sample from the distribution")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int, help="random seed for sampling")


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS), help="execution provider (default cpu)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--precision", default="fp32", type=parse_precision,
                   help="build to load: fp32 (default), fp16, int8, q4, ... for every graph, or per graph as "
                        "vision=int8,embed=q4,decoder=q4")
    p.add_argument("--no-split", action="store_true", help="do not split images into tiles (global image only)")
    p.add_argument("--qnn-fallback", action="store_true",
                   help="--provider qnn: let the CPU run the nodes the HTP backend refuses in a qdq graph (needed "
                        "for a qdq decoder; without it each qdq graph must go to HTP whole)")
    _add_provider_flags(p, provider=False)


def _add_provider_flags(p: argparse.ArgumentParser, provider: bool = True) -> None:
    if provider:
        p.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS), help="execution provider (default cpu)")
        p.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--provider-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an execution provider option, e.g. MLComputeUnits=CPUAndNeuralEngine (coreml), "
                        "NNAPI_FLAG_USE_FP16=1 (nnapi), intra_op_num_threads=4 (xnnpack); repeat for several")
    p.add_argument("--fallback", choices=FALLBACKS,
                   help="when this onnxruntime lacks --provider: warn and run on this provider instead of failing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smolvlm-edge",
        description="Export SmolVLM checkpoints to ONNX, check them against PyTorch, and run them with onnxruntime.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ex = sub.add_parser("export", help="export a checkpoint to a bundle of ONNX graphs (needs the [export] extra)",
                        description="Export an Idefics3/SmolVLM checkpoint to vision_encoder, embed_tokens and "
                                    "decoder_model_merged ONNX graphs, verified against PyTorch.")
    ex.add_argument("--model", required=True, help="checkpoint folder or hub id")
    ex.add_argument("--output", required=True, help="bundle folder to create")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ex.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch (not recommended)")
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    ex.add_argument("--attention", choices=("fused", "plain"), default="fused",
                    help="fused (onnxruntime contrib ops: GroupQueryAttention with an in-place KV cache in the "
                         "decoder, MultiHeadAttention and FastGelu in the vision encoder; CPU/CUDA/WebGPU; default) "
                         "or plain (standard ONNX ops, for NNAPI/CoreML/XNNPACK/QNN, qdq builds and left-padded batches)")

    run = sub.add_parser("run", help="answer a prompt about images with an exported bundle",
                         description="Run an exported bundle: images and a prompt in, text out.")
    run.add_argument("--model-dir", required=True, help="exported bundle folder")
    run.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    run.add_argument("--prompt", required=True, help="question or instruction (put <image> to place images yourself)")
    run.add_argument("--stream", action="store_true", help="print text as it is generated")
    run.add_argument("--json", action="store_true", help="print one JSON object: text, prompt_ids, token_ids, timings")
    run.add_argument("--ort", action="store_true",
                     help="load the ORT-format graphs recorded in the bundle (smolvlm-edge convert-ort) instead of the .onnx")
    _add_runtime_flags(run)
    _add_generation_flags(run)

    demo = sub.add_parser("demo", help="the whole path offline: build or take a checkpoint, export, answer",
                          description="Without --model: build the offline demo checkpoint (SmolVLM-256M shape, the real "
                                      "SmolLM2-135M language model, a RANDOM vision tower), export it, and answer a "
                                      "question about a sample image. With --model: the same for that checkpoint.")
    demo.add_argument("--model", help="checkpoint folder or hub id (default: the offline demo checkpoint)")
    demo.add_argument("--output", default="out/demo-bundle", help="bundle folder (default out/demo-bundle)")
    demo.add_argument("--image", action="append", default=[], help="image file (default: a generated sample image)")
    demo.add_argument("--prompt", default="What is in this image?", help="question to ask")
    demo.add_argument("--reexport", action="store_true", help="export again even if the bundle exists")
    demo.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    demo.set_defaults(stream=True)
    _add_runtime_flags(demo)
    _add_generation_flags(demo)

    qz = sub.add_parser("quantize", help="add a quantized build (fp16, int8, q4, ...) to a bundle (needs [export])",
                        description="Add quantized graphs to a bundle under transformers.js suffixes and record them "
                                    "in manifest.json. Recipes and their options: `smolvlm-edge quantize --list`.")
    qz.add_argument("--bundle", help="exported bundle folder")
    qz.add_argument("--recipe", help="fp16, q4f16, int8, uint8, quantized, q4, bnb4, qdq")
    for flag in ("vision", "embed", "decoder"):
        qz.add_argument(f"--{flag}", help=f"recipe for the {flag} graph instead of the preset, or 'none'")
    qz.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                    help="a recipe option, e.g. algorithm=hqq or lm_head_bits=8 (see --list); "
                         "GRAPH.NAME=VALUE for one graph, e.g. vision.block_size=128")
    qz.add_argument("--calibration-images", nargs="+", default=[], help="images for calibrated recipes (qdq)")
    qz.add_argument("--calibration-prompts", nargs="+", default=[], help="prompts for calibrated recipes (qdq, gptq)")
    qz.add_argument("--overwrite", action="store_true", help="replace a build of the same precision")
    qz.add_argument("--list", action="store_true", help="list recipes and their options, then exit")

    par = sub.add_parser("parity", help="measure how far a build drifts from PyTorch and from fp32 (report + exit code)",
                         description="Compare one precision of a bundle with the PyTorch original (the manifest's "
                                     "source checkpoint, or --reference) and with the fp32 build: per-graph errors, "
                                     "teacher-forced top-1/KL/perplexity over a fixed English text, greedy "
                                     "continuations. Writes parity_PRECISION.json and .md; exits 1 when a threshold fails.")
    par.add_argument("--bundle", required=True, help="exported bundle folder")
    par.add_argument("--precision", required=True, type=parse_precision, help="build to check, e.g. q4 or vision=int8,decoder=q4")
    par.add_argument("--reference", help="PyTorch checkpoint to compare with (default: the manifest's source)")
    par.add_argument("--images", nargs="+", default=[], help="images for the vision and greedy checks (default: a generated sample)")
    par.add_argument("--prompts", nargs="+", default=["What is in this image?"], help="prompts for greedy continuations")
    par.add_argument("--text", help="text file for the teacher-forced check (default: the packaged English text)")
    par.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    par.add_argument("--output-dir", help="where to write the report (default: BUNDLE/parity)")
    _add_provider_flags(par)  # the build runs there; the fp32 build it is compared with runs on the CPU

    mo = sub.add_parser("mobile", help="write the one-file model for apps (smolvlm_mobile.onnx, optionally .ort)",
                        description="Merge a bundle's graphs, the image preprocessing and the greedy loop into one ONNX "
                                    "file for Android/iOS apps (export/mobile.py); --format ort also writes the ORT-format "
                                    "file and its required_operators config for onnxruntime mobile builds. With --image, "
                                    "the written model then answers --prompt about it (on --provider).")
    mo.add_argument("--bundle", required=True, help="exported bundle folder")
    mo.add_argument("--output", default="smolvlm_mobile.onnx", help="the .onnx file to write (default smolvlm_mobile.onnx)")
    mo.add_argument("--precision", default="fp32", type=parse_precision,
                    help="build to merge: fp32 (default), q4, ... or per graph as vision=int8,decoder=q4")
    mo.add_argument("--max-new-tokens", type=int, default=128, help="default length limit of the greedy loop (default 128)")
    mo.add_argument("--with-tokenizer", action="store_true",
                    help="question string in, answer string out (needs onnxruntime-extensions: the [mobile] extra)")
    mo.add_argument("--tokenizer-op", choices=("gpt2", "hf_json"), default="gpt2",
                    help="the --with-tokenizer encoder: gpt2 (default; GPT2Tokenizer, in onnxruntime-extensions 0.13.0, "
                         "the Android package) or hf_json (HfJsonTokenizer, newer extensions only)")
    mo.add_argument("--format", choices=("onnx", "ort"), default="onnx",
                    help="onnx (default), or ort: also convert to .ort and write <name>.required_operators.config")
    mo.add_argument("--ort-style", choices=("fixed", "runtime"), default="fixed",
                    help="ORT optimization style: fixed (default; CPU/XNNPACK) or runtime (NNAPI/CoreML)")
    mo.add_argument("--image", help="after writing, answer --prompt about this image with the written model")
    mo.add_argument("--prompt", default="What is in this image?", help="question for --image")
    _add_provider_flags(mo)

    co = sub.add_parser("convert-ort", help="add ORT-format (.ort) files of a bundle's graphs (run --ort loads them)",
                        description="Convert the three graphs of one precision of a bundle to ORT format with "
                                    "onnxruntime's converter, into the bundle's onnx/ folder (with each graph's "
                                    "required_operators config), and record them in manifest.json.")
    co.add_argument("--bundle", required=True, help="exported bundle folder")
    co.add_argument("--precision", default="fp32", type=parse_precision,
                    help="build to convert: fp32 (default), q4, ... or per graph as vision=qdq,decoder=q4")
    co.add_argument("--ort-style", choices=("fixed", "runtime"), default="fixed",
                    help="ORT optimization style: fixed (default) or runtime")

    ve = sub.add_parser("verify", help="check every file a bundle's manifest lists (size and sha256), all builds",
                        description="Check that every file manifest.json lists exists with its recorded size and "
                                    "sha256, for every build (run and SmolVLM check only the files they read).")
    ve.add_argument("--bundle", required=True, help="exported bundle folder")

    sub.add_parser("providers", help="list the execution providers this onnxruntime build offers")
    return parser


def generation_overrides(args: argparse.Namespace) -> dict:
    """Only the settings the user gave: the rest keep the bundle's defaults."""
    overrides = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
    }
    if args.greedy or args.sample:
        overrides["do_sample"] = bool(args.sample)
    return overrides


def answer(model_dir, images, prompt, args, out=None) -> dict:
    """Load a bundle, answer, and print text (streamed or not) or JSON. Returns the result dict."""
    out = out or sys.stdout
    from .pipeline import SmolVLM

    vlm = SmolVLM(model_dir, provider=args.provider, threads=args.threads, precision=args.precision,
                  fallback=getattr(args, "fallback", None),
                  provider_options=parse_provider_options(getattr(args, "provider_option", [])),
                  prefer_ort=getattr(args, "ort", False), qnn_fallback=getattr(args, "qnn_fallback", False))
    split = False if args.no_split else None
    kwargs = dict(do_image_splitting=split, **generation_overrides(args))
    if args.stream and not args.json:
        for piece in vlm.stream(prompt, images, **kwargs):
            out.write(piece)
            out.flush()
        out.write("\n")
        result = vlm.last[0]
    else:
        result = vlm.generate(prompt, images, **kwargs)
        if args.json:
            out.write(json.dumps(result.as_dict()) + "\n")
        else:
            out.write(result.text + "\n")
    return result.as_dict()


def print_timings(timings: dict, out=None) -> None:
    out = out or sys.stderr
    shown = ("vision_ms", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "prompt_tokens", "new_tokens")
    out.write("timings: " + ", ".join(f"{k}={timings.get(k)}" for k in shown) + "\n")


def parse_provider_options(items) -> dict[str, str]:
    """NAME=VALUE strings (as onnxruntime's provider options are)."""
    options = {}
    for text in items or ():
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise SmolVLMEdgeError(f"bad --provider-option {text!r}: use NAME=VALUE, e.g. MLComputeUnits=ALL")
        options[name.strip()] = value.strip()
    return options


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """The toolkit's own warnings (a provider fallback, a missing .ort) as one `warning: ...` line on stderr."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, *rest, **kwargs):
            if category.__module__.startswith("smolvlm_edge."):
                return _one_line_warning(message, category, *rest, **kwargs)
            return shown(message, category, *rest, **kwargs)

        warnings.showwarning = show
        return _main(args)


def _main(args) -> int:
    try:
        if args.command == "providers":
            from .providers import available_providers
            print("\n".join(available_providers()))
        elif args.command == "run":
            result = answer(args.model_dir, args.image, args.prompt, args)
            if not args.json:
                print_timings(result["timings"])
        elif args.command == "export":
            _require_export_extra()
            from smolvlm_edge.export.api import export_checkpoint
            export_checkpoint(args.model, args.output, overwrite=args.overwrite,
                              verify=not args.no_verify, opset=args.opset, attention=args.attention)
        elif args.command == "quantize":
            _require_export_extra()
            return run_quantize_command(args)
        elif args.command == "parity":
            return run_parity_command(args)
        elif args.command == "mobile":
            return run_mobile_command(args)
        elif args.command == "convert-ort":
            return run_convert_ort_command(args)
        elif args.command == "verify":
            run_verify_command(args)
        elif args.command == "demo":
            _require_export_extra()
            from smolvlm_edge.export.demo import run_demo
            run_demo(args)
        return 0
    except SmolVLMEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parse_option(text: str):
    """NAME=VALUE with VALUE read as an int, a float, a bool, none, or a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise SmolVLMEdgeError(f"bad --option {text!r}: use NAME=VALUE, e.g. algorithm=hqq")
    value = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    elif isinstance(value, str) and value.lstrip("-").replace(".", "", 1).isdigit():
        value = float(value)
    return name.strip(), value


def run_quantize_command(args) -> int:
    from smolvlm_edge.quantize.build import quantize_bundle
    from smolvlm_edge.quantize.recipes import RECIPES

    if args.list:
        for name, recipe in RECIPES.items():
            print(f"{name} (suffix {recipe.suffix!r})")
            for key, opt in recipe.option_table().items():
                print(f"  {key} = {opt.default!r}: {opt.doc}")
            for graph, defaults in (recipe.graph_defaults or {}).items():
                print(f"  {graph} defaults: {', '.join(f'{k}={v!r}' for k, v in defaults.items())}")
        return 0
    if not args.bundle or not args.recipe:
        raise SmolVLMEdgeError("quantize needs --bundle DIR and --recipe NAME (or --list)")
    graphs = {g: r for g, r in (("vision", args.vision), ("embed", args.embed), ("decoder", args.decoder)) if r}
    options: dict = {}
    for name, value in map(parse_option, args.option):  # GRAPH.NAME=VALUE: an option for one graph only
        graph, dot, key = name.rpartition(".")
        (options.setdefault(graph, {}) if dot else options)[key] = value
    quantize_bundle(args.bundle, args.recipe, graphs=graphs or None, options=options,
                    calibration_images=tuple(args.calibration_images),
                    calibration_prompts=tuple(args.calibration_prompts), overwrite=args.overwrite)
    return 0


def run_parity_command(args) -> int:
    from pathlib import Path

    from smolvlm_edge.quantize.parity import DEFAULT_TEXT, run_parity
    from smolvlm_edge.quantize.report import write_report

    precision = args.precision
    name = precision if isinstance(precision, str) else "mixed-" + "-".join(precision.values())
    report = run_parity(args.bundle, precision, reference=args.reference, images=tuple(args.images),
                        prompts=tuple(args.prompts), text_file=Path(args.text) if args.text else DEFAULT_TEXT,
                        new_tokens=args.new_tokens, threads=args.threads, provider=args.provider,
                        provider_settings={"provider_options": parse_provider_options(args.provider_option),
                                           "fallback": args.fallback})
    report["precision"] = name
    json_path, md_path = write_report(report, Path(args.output_dir) if args.output_dir else Path(args.bundle) / "parity")
    print(f"parity of {name}: {'PASSED' if report['passed'] else 'FAILED'} (report: {md_path}, {json_path})")
    for failure in report["failures"]:
        print(f"  {failure}")
    return 0 if report["passed"] else 1


def _require_onnx(command: str) -> None:
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise SmolVLMEdgeError(f"{command} needs the onnx package (not installed): pip install 'smolvlm-edge[export]'")


def _check_precisions(bundle, precision) -> None:
    """Every graph has the asked-for build, or one line naming what the bundle has."""
    from .bundle import GRAPH_NAMES

    chosen = precision if isinstance(precision, dict) else {g: precision for g in GRAPH_NAMES}
    for graph, name in chosen.items():
        have = bundle.precisions(graph)
        if name not in have:
            raise SmolVLMEdgeError(f"unknown precision {name!r} for {graph} in {bundle.path}: it has "
                                   f"{', '.join(have) or 'none'} (add builds with smolvlm-edge quantize)")


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else (f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B")


def run_mobile_command(args, out=None) -> int:
    import importlib.util
    from pathlib import Path

    from .bundle import open_bundle

    out = out or sys.stdout
    bundle = open_bundle(args.bundle)
    _check_precisions(bundle, args.precision)
    if args.max_new_tokens < 1:
        raise SmolVLMEdgeError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.with_tokenizer and importlib.util.find_spec("onnxruntime_extensions") is None:
        raise SmolVLMEdgeError("--with-tokenizer needs onnxruntime-extensions (not installed): "
                               "pip install 'smolvlm-edge[mobile]' (onnxruntime-extensions==0.15.2)")
    output = Path(args.output)
    if output.suffix.lower() != ".onnx":
        raise SmolVLMEdgeError(f"--output must name an .onnx file, got {output} (--format ort adds the .ort beside it)")
    _require_onnx("mobile")
    options = parse_provider_options(args.provider_option)
    from smolvlm_edge.export.mobile import build_mobile_model, weights_files

    path = build_mobile_model(bundle.path, output, precision=args.precision, max_new_tokens=args.max_new_tokens,
                              with_tokenizer=args.with_tokenizer, tokenizer_op=args.tokenizer_op,
                              progress=lambda line: print(line, file=out))
    written = [path, *weights_files(path)]
    model = path
    if args.format == "ort":
        import onnxruntime as ort

        from smolvlm_edge.export.ort_format import OrtVersionWarning, app_version_warning, convert_to_ort

        model, config = convert_to_ort(path, style=args.ort_style)
        written += [model, config]
        note = app_version_warning(model, ort.__version__)  # an .ort loads only in its writer's onnxruntime or newer
        if note:
            warnings.warn(note, OrtVersionWarning, stacklevel=2)
    for file in written:
        print(f"  {file}  {_size(file.stat().st_size)}", file=out)
    if args.image:
        try_mobile_model(model, bundle.path, args.image, args.prompt, args, options, out)
    return 0


def try_mobile_model(model, bundle_dir, image, prompt, args, options, out) -> None:
    """Answer `prompt` about `image` with the written model, on the chosen provider (the mobile-runner path)."""
    import numpy as np

    from smolvlm_edge.export import mobile

    from .images import load_image
    from .prompt import TextProcessor
    from .providers import choose_provider, make_session

    choice = choose_provider(args.provider, args.threads, options, args.fallback)
    session = make_session(model, choice, args.threads, custom_ops=True)
    rgb = np.asarray(load_image(image))  # upright (EXIF) RGB, alpha on white: what the app hands the model
    text = TextProcessor.from_dir(bundle_dir)
    info = mobile.model_info(session)
    if info["with_tokenizer"]:
        ids = mobile.run_mobile_model(session, rgb, prompt)
    else:
        prompt_text = text.expand_image_tokens(text.render(text.messages_for(prompt, 1)), [0], [0])
        ids = mobile.run_mobile_model(session, rgb, np.array([text.encode(prompt_text)], dtype=np.int64))
    print(f"{model.name} on {', '.join(session.get_providers())}: {text.decode(ids)!r}", file=out)
    print(f"generated_ids: {ids}", file=out)


def run_verify_command(args, out=None) -> None:
    """Every listed file of the bundle against its manifest (open_bundle's full check); one line when all match."""
    from .bundle import MANIFEST, open_bundle

    bundle = open_bundle(args.bundle)
    files = bundle.manifest["files"]
    builds = sorted({precision for entries in bundle.manifest["graphs"].values() for precision in entries})
    size = sum(entry.get("size", 0) for entry in files.values())
    print(f"{bundle.path}: {len(files)} files ({size / 1e6:.1f} MB; builds {', '.join(builds)}) match {MANIFEST}",
          file=out or sys.stdout)


def run_convert_ort_command(args) -> int:
    from .bundle import open_bundle

    bundle = open_bundle(args.bundle)
    _check_precisions(bundle, args.precision)
    _require_onnx("convert-ort")
    from smolvlm_edge.export.ort_format import convert_bundle_to_ort

    convert_bundle_to_ort(bundle.path, args.precision, style=args.ort_style)
    return 0


def _require_export_extra() -> None:
    """Fail early, with the install line, when the export extra is missing (without importing it)."""
    import importlib.util

    missing = [name for name in ("torch", "transformers", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise SmolVLMEdgeError(
            f"this command needs the export extra ({', '.join(missing)} not installed): pip install 'smolvlm-edge[export]'"
        )


if __name__ == "__main__":
    sys.exit(main())
