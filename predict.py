"""Use a trained run: generate text, classify inputs, evaluate a split, or export it.

  python predict.py --workdir runs/gpt --generate "ROMEO:" --num_tokens 256 --temperature 0.8 --top_k 40 --seed 1
  python predict.py --workdir runs/digits --classify digits.csv --top 3      # or a .npy file, or - for stdin
  python predict.py --workdir runs/digits --evaluate test [--quantize]
  python predict.py --workdir runs/digits --export exported/digits [--quantize]
  python predict.py --workdir runs/mnist_cnn --explain test --num_examples 16     # attributions.png, .npz
  python predict.py --workdir runs/gpt --explain_text "ROMEO:"        # attention maps (text models: --explain too)
  python predict.py --workdir runs/sft --chat_eval data/reverse/sft_test.jsonl --num_tokens 32   # held-out exact match

Reads WORKDIR/config.json and a checkpoint (--checkpoint latest, best or a step number). An
entry point beside launch.py because prediction has its own flags (sampling, inputs, export) that
training never reads; like launch.py it defines flags and calls research/inference/, nothing else.
"""

import sys

from absl import app, flags, logging

from research import runtime

runtime.configure_process()  # as launch.py: XLA flags and allocator, before JAX starts (research/runtime.py)

from research import errors  # noqa: E402
from research.errors import fail  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "the run's directory (config.json and checkpoints/)")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "latest", "which checkpoint: latest, best (by the run's checkpoint.best_metric) or a step number"
)
_EXPERIMENTS = flags.DEFINE_string("experiments_dir", "experiments", "where the run's experiment module lives")
_GENERATE = flags.DEFINE_string("generate", None, "generate text continuing this prompt (language models)")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 256, "how many tokens to generate")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "sampling temperature; 0 is greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "sample among the fewest tokens whose probability reaches p (1: all)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_KEEP = flags.DEFINE_integer(
    "keep",
    None,
    "GPT past its block_size: tokens of context kept when the window slides "
    "(default half the block; block_size - 1 is nanoGPT's slide by one token)",
)
_UNCACHED = flags.DEFINE_boolean(
    "uncached", False, "GPT: also generate without the key/value cache and print both rates"
)
_CLASSIFY = flags.DEFINE_string(
    "classify", None, "classify the examples in this file (.npy, or text: one per line; - for stdin)"
)
_TOP = flags.DEFINE_integer("top", 3, "classes printed per example")
_EVALUATE = flags.DEFINE_string("evaluate", None, "evaluate this split (train, validation, test) and print the metrics")
_EXPLAIN = flags.DEFINE_string("explain", None, "attribute the predictions on this split's first examples to inputs")
_EXPLAIN_TEXT = flags.DEFINE_string("explain_text", None, "a text model's attention maps for this input")
_EXPLAIN_METHOD = flags.DEFINE_enum("explain_method", "integrated_gradients", ["integrated_gradients", "saliency"], "")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 16, "examples --explain explains")
_EXPLAIN_STEPS = flags.DEFINE_integer("explain_steps", 64, "integrated gradients' path steps")
_EXPLAIN_DIR = flags.DEFINE_string("explain_dir", None, "where --explain writes (default WORKDIR/explain)")
_EXPORT = flags.DEFINE_string("export", None, "write a jax.export artifact and a manifest to this directory")
_CHAT_EVAL = flags.DEFINE_string("chat_eval", None, "exact match of the last assistant turns of this JSONL's messages")
_CHAT_TEMPLATE = flags.DEFINE_string(
    "chat_template", None, "--chat_eval's template: chatml, llama3 or a path (default: the run's chat corpus's)"
)
_QUANTIZE = flags.DEFINE_boolean(
    "quantize",
    False,
    "int8 weights (per output channel): --evaluate reports before/after; --export stores them; "
    "--generate and --classify use them",
)


PREDICT_MEMORY_ADVICE = (
    "--quantize (int8 weights), fewer --num_tokens, --num_examples or --explain_steps, or a larger device"
)


def run_action(run) -> None:
    """The one action the flags ask for, printed."""
    from research.inference import export, predict, quantize
    from research.inference.generate import Sampling

    predicts = _GENERATE.value is not None or _CLASSIFY.value is not None
    if _QUANTIZE.value and predicts:  # predict with the int8 weights
        run = run.with_params(quantize.dequantize(quantize.quantize(run.params)))
    if _GENERATE.value is not None:
        sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _SEED.value)
        result = predict.generate_text(run, _GENERATE.value, _NUM_TOKENS.value, sampling, keep=_KEEP.value)
        print(_GENERATE.value + result["text"])
        print(
            f"\n[{_NUM_TOKENS.value} tokens, {result['tokens_per_second']:.0f} tokens/s with the cache; "
            f"{run.name} step {run.step}]",
            file=sys.stderr,
        )
        if _UNCACHED.value:
            uncached = predict.generate_text(
                run, _GENERATE.value, _NUM_TOKENS.value, sampling, cached=False, keep=_KEEP.value
            )
            print(
                f"[{uncached['tokens_per_second']:.0f} tokens/s without it; "
                f"same text: {uncached['text'] == result['text']}]",
                file=sys.stderr,
            )
    elif _CLASSIFY.value is not None:
        inputs = predict.read_inputs(_CLASSIFY.value, sys.stdin.read() if _CLASSIFY.value == "-" else None)
        for index, top in enumerate(predict.classify(run, inputs, _TOP.value)):
            print(f"{index}: " + "  ".join(f"{name} {probability:.3f}" for name, probability in top))
    elif _EVALUATE.value is not None:
        if _QUANTIZE.value:
            print(quantize.format_report(quantize.report(run, _EVALUATE.value)))
        else:
            results = predict.evaluate(run, _EVALUATE.value)
            names = (
                predict.class_names(run, len(results["confusion_matrix"])) if "confusion_matrix" in results else None
            )
            print(f"{run.name} step {run.step}, split {_EVALUATE.value}\n" + predict.format_metrics(results, names))
            if run.config.pruning.sparsity > 0:
                from research.optim import pruning

                print(pruning.sparse_report(run.params, run.config.pruning.include))
    elif _EXPLAIN.value is not None or _EXPLAIN_TEXT.value is not None:
        from pathlib import Path

        from research.inference import explain, explain_text

        directory = _EXPLAIN_DIR.value or Path(_WORKDIR.value) / "explain"
        if _EXPLAIN_TEXT.value is not None:
            line = explain_text.explain_run(run, None, _EXPLAIN_TEXT.value, 1, _EXPLAIN_STEPS.value, directory)
        else:
            line = explain.explain_run(
                run, _EXPLAIN.value, _EXPLAIN_METHOD.value, _NUM_EXAMPLES.value, _EXPLAIN_STEPS.value, directory
            )
        print(line)
    elif _CHAT_EVAL.value is not None:
        from research.inference import chat

        template = chat.run_template(run, _CHAT_TEMPLATE.value)
        result = chat.exact_match(
            run, chat.read_conversations(_CHAT_EVAL.value), template, num_tokens=_NUM_TOKENS.value
        )
        for reply in result["replies"][:3]:
            print(f"  {reply!r}")
        print(f"{run.name} step {run.step}: exact match {result['exact_match']:.3f} of {result['conversations']}")
    elif _EXPORT.value is not None:
        manifest = export.export_run(run, _EXPORT.value, quantized=_QUANTIZE.value)
        print(
            f"wrote {_EXPORT.value}: {manifest['artifact']} ({manifest['artifact_bytes']} bytes) and {export.MANIFEST}"
        )
    else:
        fail(
            "pass one of --generate PROMPT, --classify FILE, --evaluate SPLIT, --explain SPLIT, --explain_text TEXT, "
            "--chat_eval FILE or --export DIR"
        )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags take the form --name=value")
    if _WORKDIR.value is None:
        fail("pass --workdir DIR of a trained run")
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only checkpoint directory is read-only
    from research.inference import predict

    # A ValueError here is a bad input too (a file of examples that does not parse, a split that does not exist).
    with errors.exit_on_error(PREDICT_MEMORY_ADVICE, errors.BAD_INPUT_EXIT, bad_input=(ValueError,)):
        run_action(predict.load_run(_WORKDIR.value, _EXPERIMENTS.value, _CHECKPOINT.value))


if __name__ == "__main__":
    app.run(main)
